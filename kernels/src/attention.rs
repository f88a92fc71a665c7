//! Block-sparse causal attention for the stage-2 transformer (docs/model.md §1).
//!
//! Provides:
//! - [`MaskKind`] and [`layer_mask_kind`]: the three DALL·E mask families (row, column, conv) and
//!   which layer uses which;
//! - [`allowed_reference`]: the brute-force reading of the spec, one `(query, key)` pair at a time;
//! - [`BlockLayout`]: the sequence cut into blocks, and for each query block the key blocks that hold
//!   at least one allowed pair, each either *full* or carrying a compact intra-block mask (one `u64`
//!   of key bits per query row). This is what a CUDA launcher uploads;
//! - [`attention_forward`] / [`attention_backward`]: flash-attention-style CPU references that visit
//!   only the non-zero blocks of the layout. No `T × T` matrix exists anywhere: forward saves the
//!   per-row log-sum-exp, backward recomputes the probabilities from it;
//! - [`AttentionOps`]: both on a [`Device`]; for [`Cpu`] these references (on widened inputs), for
//!   `Gpu` the CUDA kernels of `kernels/cuda/attention.cu` (launchers in `gpu::attention`), which
//!   read the same [`BlockLayout`] tables.
//!
//! Invariants the code cannot show:
//! - scores are scaled by `1/sqrt(HS)` (applied to q once, when it is gathered);
//! - `lse[b, h, p]` is the log-sum-exp of the *scaled* scores of row `p` over its allowed keys;
//! - `dqkv` is an activation gradient and is overwritten (`=`), never accumulated;
//! - every row allows at least itself, so every softmax is defined.
//!
//! Buffers (dimension letters as in `lib.rs`, `NH` heads, `C = NH·HS`): `qkv` is `[B, T, 3C]` as the
//! fused qkv linear layer writes it (q in columns `0..C`, k in `C..2C`, v in `2C..3C`; head `h` uses
//! columns `h·HS..(h+1)·HS` of each); `out` is `[B, T, C]`; `lse` is `[B, NH, T]`.
//!
//! How the CPU version runs: one rayon task per `(batch, head)` pair. A task gathers its head's q,
//! k, v into contiguous per-thread scratch (plus transposed copies of k and, for backward, v), then
//! walks the query blocks: every listed block pair is a few small matrix products in register
//! tiles (4 × 16 with AVX2, 8 × 32 with AVX-512, chosen at run time; plain loops elsewhere), and a
//! masked block with few allowed pairs is done pair by pair instead. Each task writes its head's
//! columns of `out` / `dqkv` in place. The block size is a [`BlockLayout`] argument;
//! [`DEFAULT_BLOCK`] was the fastest at the benchmark shapes (`examples/bench_attention.rs`).

use rayon::prelude::*;

use crate::device::{store, widen, Cpu, Device, Elem};
use crate::error::{check_len, KernelError, Result};
use crate::simd::{fast_exp, fmadd, max8, sum8, Isa};

/// Block-sparse attention on a [`Device`] (the CUDA kernels: `kernels/cuda/attention.cu`).
///
/// `qkv`, `out` (and in the backward pass `dout`, `dqkv`) are stored as `T`: f16 on the GPU, as
/// the qkv and projection matmuls read and write them (DESIGN.md, Precision), or f32; `lse` is
/// always f32 and all arithmetic is f32. Shapes and what is overwritten as the module doc says.
pub trait AttentionOps: Device {
    /// A [`BlockLayout`]'s tables where this device's kernels read them; built once per layout
    /// with [`AttentionOps::attention_layout`], used by every call.
    type Layout;

    /// Uploads `layout`'s tables.
    fn attention_layout(&self, layout: &BlockLayout) -> Result<Self::Layout>;

    /// [`attention_forward`] on this device: `out` and `lse` are overwritten.
    #[allow(clippy::too_many_arguments)]
    fn attention_forward<T: Elem>(
        &self,
        out: &mut Self::Buf<T>,
        lse: &mut Self::Buf<f32>,
        qkv: &Self::Buf<T>,
        layout: &Self::Layout,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
    ) -> Result<()>;

    /// [`attention_backward`] on this device: `dqkv` is overwritten; `out` and `lse` are the
    /// forward pass's.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward<T: Elem>(
        &self,
        dqkv: &mut Self::Buf<T>,
        dout: &Self::Buf<T>,
        qkv: &Self::Buf<T>,
        out: &Self::Buf<T>,
        lse: &Self::Buf<f32>,
        layout: &Self::Layout,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
    ) -> Result<()>;
}

impl AttentionOps for Cpu {
    type Layout = BlockLayout;

    fn attention_layout(&self, layout: &BlockLayout) -> Result<BlockLayout> {
        Ok(layout.clone())
    }

    /// The f32 reference on the widened inputs, `out` rounded to `T`.
    fn attention_forward<T: Elem>(
        &self,
        out: &mut Vec<T>,
        lse: &mut Vec<f32>,
        qkv: &Vec<T>,
        layout: &BlockLayout,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
    ) -> Result<()> {
        let mut o = vec![0.0f32; out.len()];
        attention_forward(&mut o, lse, &widen(qkv), layout, b, t, nh, hs)?;
        store(out, o);
        Ok(())
    }

    /// The f32 reference on the widened inputs, `dqkv` rounded to `T`.
    fn attention_backward<T: Elem>(
        &self,
        dqkv: &mut Vec<T>,
        dout: &Vec<T>,
        qkv: &Vec<T>,
        out: &Vec<T>,
        lse: &Vec<f32>,
        layout: &BlockLayout,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
    ) -> Result<()> {
        let mut g = vec![0.0f32; dqkv.len()];
        let (dout, qkv, out) = (widen(dout), widen(qkv), widen(out));
        attention_backward(&mut g, &dout, &qkv, &out, lse, layout, b, t, nh, hs)?;
        store(dqkv, g);
        Ok(())
    }
}

/// Block size (positions per block) used when the caller has no reason to pick another. Measured
/// with `examples/bench_attention.rs` at the tiny/small/paperseq shapes (one core, AVX-512): 32 was
/// fastest overall, 16 close (less masked waste, smaller tiles), 64 slower (more masked waste).
pub const DEFAULT_BLOCK: usize = 32;

/// Largest supported block: an intra-block mask row is one `u64`.
pub const MAX_BLOCK: usize = 64;

/// The paper's convolutional mask width.
pub const DEFAULT_CONV_KERNEL: usize = 11;

/// Which image-to-image mask a layer uses (text rows are always plain causal).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskKind {
    /// The previous `G + 1` image positions in raster order (itself included).
    Row,
    /// The same column, earlier rows (itself included).
    Column,
    /// A `kernel × kernel` neighbourhood (`kernel` odd), intersected with causality.
    Conv { kernel: usize },
}

/// The mask of layer `layer` (0-based) out of `layers`: conv for the last layer, else column when
/// `layer % 4 == 1`, else row.
pub fn layer_mask_kind(layer: usize, layers: usize, conv_kernel: usize) -> MaskKind {
    if layer + 1 == layers {
        MaskKind::Conv {
            kernel: conv_kernel,
        }
    } else if layer % 4 == 1 {
        MaskKind::Column
    } else {
        MaskKind::Row
    }
}

/// The brute-force reading of the spec: may query `p` attend key `q`?
pub fn allowed_reference(text_len: usize, grid: usize, kind: MaskKind, p: usize, q: usize) -> bool {
    if q > p {
        return false;
    }
    if p < text_len || q < text_len {
        return true;
    }
    if grid == 0 {
        return false; // no image positions exist
    }
    let (i, j) = (p - text_len, q - text_len);
    let (ri, ci) = (i / grid, i % grid);
    let (rj, cj) = (j / grid, j % grid);
    match kind {
        MaskKind::Row => i - j <= grid,
        MaskKind::Column => cj == ci,
        MaskKind::Conv { kernel } => {
            let k = kernel.saturating_sub(1) / 2;
            ri.abs_diff(rj) <= k && ci.abs_diff(cj) <= k
        }
    }
}

/// Calls `f(lo, hi)` for each maximal run `lo..hi` of keys that query `p` may attend, in increasing
/// order. Derived from the spec's geometry rather than by testing pairs, so that the layout built
/// from it and [`allowed_reference`] are two independent readings that the tests compare.
fn allowed_runs(
    text_len: usize,
    grid: usize,
    kind: MaskKind,
    p: usize,
    mut f: impl FnMut(usize, usize),
) {
    if p < text_len {
        f(0, p + 1);
        return;
    }
    if text_len > 0 {
        f(0, text_len);
    }
    let i = p - text_len;
    let (ri, ci) = (i / grid, i % grid);
    match kind {
        MaskKind::Row => f(text_len + i.saturating_sub(grid), p + 1),
        MaskKind::Column => {
            for r in 0..=ri {
                let q = text_len + r * grid + ci;
                f(q, q + 1);
            }
        }
        MaskKind::Conv { kernel } => {
            let k = (kernel - 1) / 2;
            let (c_lo, c_hi) = (ci.saturating_sub(k), (ci + k).min(grid - 1));
            for r in ri.saturating_sub(k)..=ri {
                let row0 = text_len + r * grid;
                f(row0 + c_lo, (row0 + c_hi).min(p) + 1);
            }
        }
    }
}

/// The low `width` bits set (`width <= 64`).
#[inline(always)]
fn low_bits(width: usize) -> u64 {
    if width >= 64 {
        u64::MAX
    } else {
        (1u64 << width) - 1
    }
}

/// One non-zero `(query block, key block)` pair of a [`BlockLayout`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockEntry {
    /// Index of the key block.
    pub key_block: usize,
    /// `None` when every pair of the block is allowed; otherwise the offset in
    /// [`BlockLayout::masks`] of `block` words, word `r` holding bit `c` iff query `qb·block + r` may
    /// attend key `key_block·block + c`.
    pub mask: Option<usize>,
}

/// A block-sparse attention layout: the sequence cut into blocks of `block` positions (the last one
/// may be partial) and, per query block, the sorted list of key blocks with at least one allowed pair
/// (compressed sparse rows).
#[derive(Clone, Debug)]
pub struct BlockLayout {
    text_len: usize,
    grid: usize,
    kind: MaskKind,
    block: usize,
    seq_len: usize,
    n_blocks: usize,
    /// Entries of query block `qb` are `entries[row_start[qb]..row_start[qb + 1]]`.
    row_start: Vec<usize>,
    entries: Vec<BlockEntry>,
    masks: Vec<u64>,
    allowed_pairs: u64,
}

impl BlockLayout {
    /// Builds the layout of `kind` for `text_len` text positions and a `grid × grid` image, cut into
    /// blocks of `block` positions (`1..=MAX_BLOCK`). Errors on a bad block size, an even or zero
    /// conv kernel, or an empty sequence.
    pub fn new(text_len: usize, grid: usize, kind: MaskKind, block: usize) -> Result<Self> {
        const OP: &str = "BlockLayout::new";
        let shape = |what: String| KernelError::Shape { op: OP, what };
        if block == 0 || block > MAX_BLOCK {
            return Err(shape(format!("block {block} must be in 1..={MAX_BLOCK}")));
        }
        if let MaskKind::Conv { kernel } = kind {
            if kernel == 0 || kernel % 2 == 0 {
                return Err(shape(format!("conv kernel {kernel} must be odd and >= 1")));
            }
        }
        let seq_len = grid
            .checked_mul(grid)
            .and_then(|g2| g2.checked_add(text_len))
            .ok_or_else(|| shape(format!("text_len {text_len} + grid {grid}² overflows")))?;
        if seq_len == 0 {
            return Err(shape("empty sequence (text_len 0 and grid 0)".into()));
        }
        let n_blocks = seq_len.div_ceil(block);

        // Mask words of the current query block against every key block, and which were touched.
        let mut bits = vec![0u64; n_blocks * block];
        let mut touched = vec![false; n_blocks];
        let mut row_start = vec![0];
        let mut entries = Vec::new();
        let mut masks = Vec::new();
        let mut allowed_pairs = 0u64;
        for qb in 0..n_blocks {
            let p0 = qb * block;
            let rows = block.min(seq_len - p0);
            for r in 0..rows {
                allowed_runs(text_len, grid, kind, p0 + r, |lo, hi| {
                    let mut q = lo;
                    while q < hi {
                        let kb = q / block;
                        let (c0, c1) = (q - kb * block, (hi - kb * block).min(block));
                        bits[kb * block + r] |= low_bits(c1) & !low_bits(c0);
                        touched[kb] = true;
                        q = kb * block + c1;
                    }
                });
            }
            // Keys never exceed the query (causality), so only key blocks 0..=qb can be touched.
            for kb in 0..=qb {
                if !std::mem::take(&mut touched[kb]) {
                    continue;
                }
                let words = &mut bits[kb * block..(kb + 1) * block];
                let full_row = low_bits(block.min(seq_len - kb * block));
                allowed_pairs += words.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
                let mask = if words[..rows].iter().all(|&w| w == full_row) {
                    None
                } else {
                    masks.extend_from_slice(words);
                    Some(masks.len() - block)
                };
                entries.push(BlockEntry {
                    key_block: kb,
                    mask,
                });
                words.fill(0);
            }
            row_start.push(entries.len());
        }
        Ok(Self {
            text_len,
            grid,
            kind,
            block,
            seq_len,
            n_blocks,
            row_start,
            entries,
            masks,
            allowed_pairs,
        })
    }

    /// T = text_len + grid².
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Tt, the number of text positions (they come first).
    pub fn text_len(&self) -> usize {
        self.text_len
    }

    /// G, the image side (G² image positions after the text, raster order).
    pub fn grid(&self) -> usize {
        self.grid
    }

    /// The mask this layout encodes.
    pub fn kind(&self) -> MaskKind {
        self.kind
    }

    /// Positions per block.
    pub fn block(&self) -> usize {
        self.block
    }

    /// Number of blocks, `ceil(T / block)`.
    pub fn num_blocks(&self) -> usize {
        self.n_blocks
    }

    /// Number of positions in block `blk` (`block`, or fewer for the last one).
    pub fn block_len(&self, blk: usize) -> usize {
        self.block.min(self.seq_len - blk * self.block)
    }

    /// The non-zero key blocks of query block `qb`, sorted by key block.
    pub fn key_blocks(&self, qb: usize) -> &[BlockEntry] {
        &self.entries[self.row_start[qb]..self.row_start[qb + 1]]
    }

    /// All intra-block mask words (see [`BlockEntry::mask`]).
    pub fn masks(&self) -> &[u64] {
        &self.masks
    }

    /// The keys of `entry` that row `r` of its query block may attend, as bits.
    #[inline(always)]
    pub fn row_bits(&self, entry: &BlockEntry, r: usize) -> u64 {
        match entry.mask {
            None => low_bits(self.block_len(entry.key_block)),
            Some(off) => self.masks[off + r],
        }
    }

    /// May query `p` attend key `q`? Answered from the layout's blocks and masks.
    pub fn allowed(&self, p: usize, q: usize) -> bool {
        if p >= self.seq_len || q >= self.seq_len {
            return false;
        }
        let (qb, kb) = (p / self.block, q / self.block);
        let row = self.key_blocks(qb);
        match row.binary_search_by_key(&kb, |e| e.key_block) {
            Ok(i) => self.row_bits(&row[i], p % self.block) >> (q % self.block) & 1 == 1,
            Err(_) => false,
        }
    }

    /// Number of allowed `(p, q)` pairs (the useful work of one head).
    pub fn allowed_pairs(&self) -> u64 {
        self.allowed_pairs
    }

    /// Number of non-zero `(query block, key block)` pairs.
    pub fn nonzero_blocks(&self) -> usize {
        self.entries.len()
    }

    /// Most key blocks any query block visits.
    fn max_row_blocks(&self) -> usize {
        self.row_start
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------------------------
// Inner loops. Written once, generic over whether fused multiply-add is available (`FMA`) and
// whether the 8 × 32 AVX-512 tile may be used (`WIDE`), and compiled three times: plain, inside
// `#[target_feature(enable = "avx2,fma")]` and inside an AVX-512 one; [`Isa::best`] picks at run
// time. Hot loops take no closures: a closure is a separate function that does not inherit
// `#[target_feature]`, and a `mul_add` in one becomes a libm call.

/// `y += a·x`.
#[inline(always)]
fn axpy<const FMA: bool>(y: &mut [f32], a: f32, x: &[f32]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi = fmadd::<FMA>(a, xi, *yi);
    }
}

/// Dot product with eight independent accumulators, so that it vectorises.
#[inline(always)]
fn dot8<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] = fmadd::<FMA>(x[l], y[l], acc[l]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `C[m × n] (+)= A[m × k] · B[k × n]` (`+=` when `accumulate`, else `=`), every block product of
/// this module. `C` is row-major with row stride `ldc`; `A[r, l]` is read at `a[r·a_rs + l·a_cs]`
/// (so a transposed `A` costs nothing); `B` is row-major with row stride `ldb`.
///
/// Register tiles share each row of `B` across several rows of `C`: 4 × 16 (eight AVX2 registers
/// of accumulators), or with `WIDE` (AVX-512 only) 8 × 32 (sixteen 512-bit registers); the edges
/// fall back to smaller tiles, then to plain loops.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn gemm_acc<const FMA: bool, const WIDE: bool>(
    c: &mut [f32],
    ldc: usize,
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    ldb: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    // Every index the tiles touch is below these bounds, so the tiles may skip bounds checks.
    assert!(
        (m - 1) * ldc + n <= c.len()
            && (m - 1) * a_rs + (k - 1) * a_cs < a.len()
            && (k - 1) * ldb + n <= b.len(),
        "gemm_acc: operand too short"
    );
    let g = Gemm {
        c: c.as_mut_ptr(),
        ldc,
        k,
        a: a.as_ptr(),
        a_rs,
        a_cs,
        b: b.as_ptr(),
        ldb,
        accumulate,
    };
    let mut r0 = 0;
    // SAFETY (all calls): rows r0..r0 + rows ≤ m and columns ≤ n, which the assertion bounds;
    // `WIDE` is only instantiated inside `#[target_feature(enable = "avx512f", ...)]` functions.
    #[cfg(target_arch = "x86_64")]
    if WIDE {
        while r0 + 8 <= m {
            let mut x0 = 0;
            while x0 + 32 <= n {
                unsafe { g.tile_8x32_avx512(r0, x0) };
                x0 += 32;
            }
            unsafe {
                g.rows::<FMA, 4>(r0, x0, n);
                g.rows::<FMA, 4>(r0 + 4, x0, n);
            }
            r0 += 8;
        }
    }
    while r0 + 4 <= m {
        unsafe { g.rows::<FMA, 4>(r0, 0, n) };
        r0 += 4;
    }
    while r0 < m {
        unsafe { g.rows::<FMA, 1>(r0, 0, n) };
        r0 += 1;
    }
}

/// The operands of one [`gemm_acc`] call, bounds already checked.
struct Gemm {
    c: *mut f32,
    ldc: usize,
    k: usize,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    ldb: usize,
    accumulate: bool,
}

impl Gemm {
    /// Rows `r0..r0 + MR`, columns `x0..n`: 4 × 16 tiles, then plain loops.
    ///
    /// # Safety
    /// Rows and columns within the bounds [`gemm_acc`] asserted.
    #[inline(always)]
    unsafe fn rows<const FMA: bool, const MR: usize>(&self, r0: usize, mut x0: usize, n: usize) {
        const NR: usize = 16;
        let Gemm {
            c,
            ldc,
            k,
            a,
            a_rs,
            a_cs,
            b,
            ldb,
            accumulate,
        } = *self;
        while x0 + NR <= n {
            let mut acc = [[0f32; NR]; MR];
            if accumulate {
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    for (x, v) in acc_r.iter_mut().enumerate() {
                        *v = *c.add((r0 + r) * ldc + x0 + x);
                    }
                }
            }
            for l in 0..k {
                let b_row = b.add(l * ldb + x0);
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let a_rl = *a.add((r0 + r) * a_rs + l * a_cs);
                    for (x, v) in acc_r.iter_mut().enumerate() {
                        *v = fmadd::<FMA>(a_rl, *b_row.add(x), *v);
                    }
                }
            }
            for (r, acc_r) in acc.iter().enumerate() {
                for (x, &v) in acc_r.iter().enumerate() {
                    *c.add((r0 + r) * ldc + x0 + x) = v;
                }
            }
            x0 += NR;
        }
        for r in r0..r0 + MR {
            if !accumulate {
                for x in x0..n {
                    *c.add(r * ldc + x) = 0.0;
                }
            }
            for l in 0..k {
                let a_rl = *a.add(r * a_rs + l * a_cs);
                for x in x0..n {
                    let v = c.add(r * ldc + x);
                    *v = fmadd::<FMA>(a_rl, *b.add(l * ldb + x), *v);
                }
            }
        }
    }

    /// One 8 × 32 tile at rows `r0..r0 + 8`, columns `x0..x0 + 32`, in sixteen AVX-512 accumulators.
    /// (Written with intrinsics: a plain `[[f32; 32]; 8]` accumulator is too big for the compiler to
    /// keep in registers.)
    ///
    /// # Safety
    /// The CPU supports AVX-512F; rows and columns within the bounds [`gemm_acc`] asserted.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile_8x32_avx512(&self, r0: usize, x0: usize) {
        use std::arch::x86_64::{
            _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm512_storeu_ps,
        };
        let Gemm {
            c,
            ldc,
            k,
            a,
            a_rs,
            a_cs,
            b,
            ldb,
            accumulate,
        } = *self;
        let mut acc = [[_mm512_setzero_ps(); 2]; 8];
        if accumulate {
            for (r, acc_r) in acc.iter_mut().enumerate() {
                for (h, v) in acc_r.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(c.add((r0 + r) * ldc + x0 + 16 * h));
                }
            }
        }
        for l in 0..k {
            let b_row = b.add(l * ldb + x0);
            let (b0, b1) = (_mm512_loadu_ps(b_row), _mm512_loadu_ps(b_row.add(16)));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let a_rl = _mm512_set1_ps(*a.add((r0 + r) * a_rs + l * a_cs));
                acc_r[0] = _mm512_fmadd_ps(a_rl, b0, acc_r[0]);
                acc_r[1] = _mm512_fmadd_ps(a_rl, b1, acc_r[1]);
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            for (h, &v) in acc_r.iter().enumerate() {
                _mm512_storeu_ps(c.add((r0 + r) * ldc + x0 + 16 * h), v);
            }
        }
    }
}

/// A masked block with fewer than `1/SPARSE_DENOM` of its pairs allowed is computed pair by pair
/// (one dot product per allowed pair) instead of as dense block products.
const SPARSE_DENOM: usize = 4;

/// Whether `entry` (against a query block of `bq` rows) takes the pair-by-pair path.
#[inline(always)]
fn is_sparse(layout: &BlockLayout, entry: &BlockEntry, bq: usize) -> bool {
    entry.mask.is_some() && {
        let allowed: u32 = (0..bq)
            .map(|r| layout.row_bits(entry, r).count_ones())
            .sum();
        allowed as usize * SPARSE_DENOM < bq * layout.block_len(entry.key_block)
    }
}

/// Sets `row[j] = −inf` wherever bit `j` of `bits` is clear.
#[inline(always)]
fn mask_row(row: &mut [f32], bits: u64) {
    if bits == low_bits(row.len()) {
        return;
    }
    for (j, x) in row.iter_mut().enumerate() {
        if bits >> j & 1 == 0 {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// The set bits of a mask word, lowest first (an iterator, not a closure-taking helper: see the
/// note on inner loops above).
struct Bits(u64);

impl Iterator for Bits {
    type Item = usize;

    #[inline(always)]
    fn next(&mut self) -> Option<usize> {
        if self.0 == 0 {
            return None;
        }
        let j = self.0.trailing_zeros() as usize;
        self.0 &= self.0 - 1;
        Some(j)
    }
}

/// `dst[d, p] = src[p, d]` for `src` `[rows, cols]`, 16 rows at a time so that every store fills
/// a whole cache line.
fn transpose(dst: &mut [f32], src: &[f32], rows: usize, cols: usize) {
    const R: usize = 16;
    let mut p0 = 0;
    while p0 + R <= rows {
        let src_rows: [&[f32]; R] = std::array::from_fn(|i| &src[(p0 + i) * cols..][..cols]);
        for d in 0..cols {
            let out = &mut dst[d * rows + p0..][..R];
            for (y, row) in out.iter_mut().zip(&src_rows) {
                *y = row[d];
            }
        }
        p0 += R;
    }
    for p in p0..rows {
        for d in 0..cols {
            dst[d * rows + p] = src[p * cols + d];
        }
    }
}

/// `dst.copy_from_slice(src)` for one head row, as inline 16-float moves: a libc `memcpy` call per
/// row costs more than the copy.
#[inline(always)]
fn copy_row(dst: &mut [f32], src: &[f32]) {
    let mut dst16 = dst.chunks_exact_mut(16);
    let mut src16 = src.chunks_exact(16);
    for (d, s) in (&mut dst16).zip(&mut src16) {
        if let (Ok(d), Ok(s)) = (<&mut [f32; 16]>::try_from(d), <&[f32; 16]>::try_from(s)) {
            *d = *s;
        }
    }
    for (d, s) in dst16.into_remainder().iter_mut().zip(src16.remainder()) {
        *d = *s;
    }
}

/// Where one task writes its head's rows of a buffer that all heads share, interleaved: row `p` of
/// the head goes to `buf[base + p·stride..][..HS]`. Tasks of different heads hold sinks over the
/// same buffer and write disjoint elements, which slices cannot express.
#[derive(Clone, Copy)]
struct RowSink<'a> {
    ptr: *mut f32,
    len: usize,
    base: usize,
    stride: usize,
    _buf: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: a sink only writes through `ptr` within `len`, and `RowSink::new`'s contract makes the
// element sets of concurrently used sinks disjoint.
unsafe impl Send for RowSink<'_> {}
unsafe impl Sync for RowSink<'_> {}

impl<'a> RowSink<'a> {
    /// A sink over `buf` (borrowed for `'a`); call [`RowSink::at`] to place it.
    fn shared(buf: &'a mut [f32]) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            base: 0,
            stride: 0,
            _buf: std::marker::PhantomData,
        }
    }

    /// The same buffer, rows at `base + p·stride`.
    ///
    /// # Safety
    /// While this sink is in use, no other sink over the buffer may write the elements it writes
    /// (in this module: each `(batch, head)` task owns its head's columns).
    unsafe fn at(self, base: usize, stride: usize) -> Self {
        Self {
            base,
            stride,
            ..self
        }
    }

    /// Writes `row` as row `p`.
    #[inline(always)]
    fn put(&self, p: usize, row: &[f32]) {
        let off = self.base + p * self.stride;
        assert!(
            off + row.len() <= self.len,
            "RowSink: row {p} out of bounds"
        );
        // SAFETY: in bounds (checked above) and not accessed by any other task (`at`'s contract).
        let dst = unsafe { std::slice::from_raw_parts_mut(self.ptr.add(off), row.len()) };
        copy_row(dst, row);
    }
}

/// Per-thread scratch (see [`HeadScratch::with`]): one head's operands gathered contiguous, plus
/// block buffers.
#[derive(Default)]
struct HeadScratch {
    /// `[T, HS]`, already multiplied by `1/sqrt(HS)`.
    q: Vec<f32>,
    /// `[T, HS]` and its transpose `[HS, T]`.
    k: Vec<f32>,
    kt: Vec<f32>,
    /// `[T, HS]` and (backward only) its transpose.
    v: Vec<f32>,
    vt: Vec<f32>,
    /// Backward only: the head's slice of `dout`, `[T, HS]`, and `D[p] = dO[p] · O[p]`.
    dout: Vec<f32>,
    delta: Vec<f32>,
    /// Backward only: `dK` and `dV` accumulators, `[T, HS]`.
    dk: Vec<f32>,
    dv: Vec<f32>,
    /// Forward: one query block's scores, then probabilities, against all its key blocks
    /// (`[block, entries·block]`). Backward: one block pair's `P` (`[block, block]`, a prefix).
    s: Vec<f32>,
    /// Backward only: one block pair's `dP`, then `dS`.
    ds: Vec<f32>,
    /// One query block's output (forward) or `dQ` (backward) accumulator, `[block, HS]`.
    acc: Vec<f32>,
    /// Forward: which key blocks of the current query block take the pair-by-pair path.
    sparse: Vec<bool>,
}

impl HeadScratch {
    /// Runs `f` with this thread's scratch, sized for `layout` and `hs`. The buffers live as long as
    /// the (rayon worker) thread, so repeated calls allocate nothing.
    fn with<R>(
        layout: &BlockLayout,
        hs: usize,
        backward: bool,
        f: impl FnOnce(&mut HeadScratch) -> R,
    ) -> R {
        thread_local! {
            static SCRATCH: std::cell::RefCell<HeadScratch> = std::cell::RefCell::new(HeadScratch::default());
        }
        SCRATCH.with(|cell| {
            let mut sc = cell.borrow_mut();
            sc.resize(layout, hs, backward);
            f(&mut sc)
        })
    }

    /// Sizes every buffer for `layout` and `hs` (contents are overwritten before use). A forward
    /// call leaves the backward-only buffers alone, so that alternating forward and backward calls
    /// (one per layer) do not shrink and regrow them.
    fn resize(&mut self, layout: &BlockLayout, hs: usize, backward: bool) {
        let (t, block) = (layout.seq_len(), layout.block());
        for (buf, len) in [
            (&mut self.q, t * hs),
            (&mut self.k, t * hs),
            (&mut self.kt, t * hs),
            (&mut self.v, t * hs),
            (&mut self.s, block * block * layout.max_row_blocks()),
            (&mut self.acc, block * hs),
        ] {
            buf.resize(len, 0.0);
        }
        if backward {
            for (buf, len) in [
                (&mut self.vt, t * hs),
                (&mut self.dout, t * hs),
                (&mut self.delta, t),
                (&mut self.dk, t * hs),
                (&mut self.dv, t * hs),
                (&mut self.ds, block * block),
            ] {
                buf.resize(len, 0.0);
            }
        }
        self.sparse.resize(layout.max_row_blocks(), false);
    }

    /// Copies head `h` of batch `bi` out of `qkv` (`[B, T, 3C]`), scaling q, and transposes k (and
    /// for backward v).
    fn gather_qkv(&mut self, qkv: &[f32], bi: usize, h: usize, dims: Dims, backward: bool) {
        let Dims { t, c, hs } = dims;
        let scale = 1.0 / (hs as f32).sqrt();
        for p in 0..t {
            let row = &qkv[(bi * t + p) * 3 * c..][..3 * c];
            let (qr, kr, vr) = (
                &row[h * hs..][..hs],
                &row[c + h * hs..][..hs],
                &row[2 * c + h * hs..][..hs],
            );
            let (qd, kd, vd) = (
                &mut self.q[p * hs..][..hs],
                &mut self.k[p * hs..][..hs],
                &mut self.v[p * hs..][..hs],
            );
            for (y, &x) in qd.iter_mut().zip(qr) {
                *y = scale * x;
            }
            copy_row(kd, kr);
            copy_row(vd, vr);
        }
        transpose(&mut self.kt, &self.k, t, hs);
        if backward {
            transpose(&mut self.vt, &self.v, t, hs);
        }
    }

    /// Backward only: copies head `h` of batch `bi` out of `dout` and computes `D = rowsum(dO ∘ O)`.
    fn gather_dout(&mut self, dout: &[f32], out: &[f32], bi: usize, h: usize, dims: Dims) {
        let Dims { t, c, hs } = dims;
        for p in 0..t {
            let off = (bi * t + p) * c + h * hs;
            let (dr, or) = (&dout[off..][..hs], &out[off..][..hs]);
            copy_row(&mut self.dout[p * hs..][..hs], dr);
            self.delta[p] = dot8::<false>(dr, or);
        }
    }
}

/// Forward for one head from the gathered scratch: rows of `O` into `out`, `lse` `[T]`. Per query
/// block: scores against every listed key block (block products, or dot products for sparse
/// blocks), an exact softmax over the row, then `O = P V` block by block.
#[inline(always)]
fn forward_head_body<const FMA: bool, const WIDE: bool>(
    out: RowSink,
    lse: &mut [f32],
    sc: &mut HeadScratch,
    layout: &BlockLayout,
) {
    let (t, block) = (layout.seq_len(), layout.block());
    let hs = sc.acc.len() / block;
    for qb in 0..layout.num_blocks() {
        let entries = layout.key_blocks(qb);
        let (p0, bq) = (qb * block, layout.block_len(qb));
        let ld = entries.len() * block;
        let q_blk = &sc.q[p0 * hs..][..bq * hs];
        let s = &mut sc.s[..bq * ld];
        let sparse = &mut sc.sparse[..entries.len()];
        for (flag, entry) in sparse.iter_mut().zip(entries) {
            *flag = is_sparse(layout, entry, bq);
        }

        // 1. Scaled scores. Dense segments: −inf where masked and in the tail of a partial key
        //    block. Sparse segments: only the allowed entries are written, and only those are read.
        for (e, entry) in entries.iter().enumerate() {
            let (k0, bk, col0) = (
                entry.key_block * block,
                layout.block_len(entry.key_block),
                e * block,
            );
            if sparse[e] {
                for r in 0..bq {
                    let row = &mut s[r * ld + col0..][..block];
                    let q_row = &q_blk[r * hs..][..hs];
                    for j in Bits(layout.row_bits(entry, r)) {
                        row[j] = dot8::<FMA>(q_row, &sc.k[(k0 + j) * hs..][..hs]);
                    }
                }
            } else {
                let kt = &sc.kt[k0..];
                gemm_acc::<FMA, WIDE>(
                    &mut s[col0..],
                    ld,
                    (bq, bk, hs),
                    q_blk,
                    (hs, 1),
                    kt,
                    t,
                    false,
                );
                for r in 0..bq {
                    mask_row(&mut s[r * ld + col0..][..block], layout.row_bits(entry, r));
                }
            }
        }

        // 2. Softmax numerators in place; the row sums normalise `O` below.
        let mut sums = [0f32; MAX_BLOCK];
        for r in 0..bq {
            let row = &mut s[r * ld..][..ld];
            let mut max = f32::NEG_INFINITY;
            for (e, seg) in row.chunks_exact(block).enumerate() {
                if sparse[e] {
                    for j in Bits(layout.row_bits(&entries[e], r)) {
                        max = max.max(seg[j]);
                    }
                } else {
                    max = max.max(max8(seg));
                }
            }
            let mut sum = 0.0;
            for (e, seg) in row.chunks_exact_mut(block).enumerate() {
                if sparse[e] {
                    for j in Bits(layout.row_bits(&entries[e], r)) {
                        seg[j] = fast_exp::<FMA>(seg[j] - max);
                        sum += seg[j];
                    }
                } else {
                    for x in seg.iter_mut() {
                        *x = fast_exp::<FMA>(*x - max);
                    }
                    sum += sum8(seg);
                }
            }
            lse[p0 + r] = max + sum.ln();
            sums[r] = sum;
        }

        // 3. O = P V, normalised, written out.
        let o = &mut sc.acc[..bq * hs];
        for (e, entry) in entries.iter().enumerate() {
            let (k0, bk, col0) = (
                entry.key_block * block,
                layout.block_len(entry.key_block),
                e * block,
            );
            if sparse[e] {
                if e == 0 {
                    o.fill(0.0);
                }
                for r in 0..bq {
                    let o_row = &mut o[r * hs..][..hs];
                    for j in Bits(layout.row_bits(entry, r)) {
                        axpy::<FMA>(o_row, s[r * ld + col0 + j], &sc.v[(k0 + j) * hs..][..hs]);
                    }
                }
            } else {
                let v = &sc.v[k0 * hs..];
                gemm_acc::<FMA, WIDE>(o, hs, (bq, hs, bk), &s[col0..], (ld, 1), v, hs, e > 0);
            }
        }
        for r in 0..bq {
            let o_row = &mut o[r * hs..][..hs];
            let inv = 1.0 / sums[r];
            for x in o_row.iter_mut() {
                *x *= inv;
            }
            out.put(p0 + r, o_row);
        }
    }
}

/// Backward for one head: rows of `dQ` into `dq`, and `dK`, `dV` accumulated in the scratch.
///
/// With `S = Q Kᵀ·scale`, `P = softmax(S)` row-wise (recomputed as `exp(S − lse)`), `O = P V`:
/// ```text
/// dV = Pᵀ dO
/// dP = dO Vᵀ
/// D  = rowsum(dO ∘ O)            (= rowsum(P ∘ dP))
/// dS = P ∘ (dP − D)
/// dQ = scale · dS K
/// dK = scale · dSᵀ Q
/// ```
/// Only listed block pairs are visited (`P` is zero elsewhere), each as five block products (or pair
/// by pair when sparse). The scratch q is already scaled, so `dK = dSᵀ q_scaled` and only `dQ`
/// needs the explicit factor.
#[inline(always)]
fn backward_head_body<const FMA: bool, const WIDE: bool>(
    dq: RowSink,
    lse: &[f32],
    sc: &mut HeadScratch,
    layout: &BlockLayout,
) {
    let (t, block, hs) = (
        layout.seq_len(),
        layout.block(),
        sc.acc.len() / layout.block(),
    );
    let scale = 1.0 / (hs as f32).sqrt();
    sc.dk.fill(0.0);
    sc.dv.fill(0.0);
    for qb in 0..layout.num_blocks() {
        let (p0, bq) = (qb * block, layout.block_len(qb));
        let q_blk = &sc.q[p0 * hs..][..bq * hs];
        let do_blk = &sc.dout[p0 * hs..][..bq * hs];
        let dq_acc = &mut sc.acc[..bq * hs];
        dq_acc.fill(0.0);
        for entry in layout.key_blocks(qb) {
            let (k0, bk) = (entry.key_block * block, layout.block_len(entry.key_block));
            let (dk, dv) = (&mut sc.dk[k0 * hs..], &mut sc.dv[k0 * hs..]);
            if is_sparse(layout, entry, bq) {
                for r in 0..bq {
                    let (q_row, do_row) = (&q_blk[r * hs..][..hs], &do_blk[r * hs..][..hs]);
                    let (lse_p, delta_p) = (lse[p0 + r], sc.delta[p0 + r]);
                    let dq_row = &mut dq_acc[r * hs..][..hs];
                    for j in Bits(layout.row_bits(entry, r)) {
                        let key = (k0 + j) * hs;
                        let k_row = &sc.k[key..][..hs];
                        let p = fast_exp::<FMA>(dot8::<FMA>(q_row, k_row) - lse_p);
                        let ds = p * (dot8::<FMA>(do_row, &sc.v[key..][..hs]) - delta_p);
                        axpy::<FMA>(&mut dv[j * hs..][..hs], p, do_row);
                        axpy::<FMA>(&mut dk[j * hs..][..hs], ds, q_row);
                        axpy::<FMA>(dq_row, ds, k_row);
                    }
                }
                continue;
            }
            let p = &mut sc.s[..bq * bk];
            let ds = &mut sc.ds[..bq * bk];
            gemm_acc::<FMA, WIDE>(p, bk, (bq, bk, hs), q_blk, (hs, 1), &sc.kt[k0..], t, false); // S
            gemm_acc::<FMA, WIDE>(
                ds,
                bk,
                (bq, bk, hs),
                do_blk,
                (hs, 1),
                &sc.vt[k0..],
                t,
                false,
            ); // dP
            for r in 0..bq {
                let (lse_p, delta_p) = (lse[p0 + r], sc.delta[p0 + r]);
                let (p_row, ds_row) = (&mut p[r * bk..][..bk], &mut ds[r * bk..][..bk]);
                mask_row(p_row, layout.row_bits(entry, r));
                for (pj, dsj) in p_row.iter_mut().zip(ds_row.iter_mut()) {
                    *pj = fast_exp::<FMA>(*pj - lse_p);
                    *dsj = *pj * (*dsj - delta_p);
                }
            }
            gemm_acc::<FMA, WIDE>(dv, hs, (bk, hs, bq), p, (1, bk), do_blk, hs, true); // dV += Pᵀ dO
            gemm_acc::<FMA, WIDE>(dk, hs, (bk, hs, bq), ds, (1, bk), q_blk, hs, true); // dK += dSᵀ Q
            gemm_acc::<FMA, WIDE>(
                dq_acc,
                hs,
                (bq, hs, bk),
                ds,
                (bk, 1),
                &sc.k[k0 * hs..],
                hs,
                true,
            ); // dQ += dS K
        }
        for (r, row) in dq_acc.chunks_exact_mut(hs).enumerate() {
            for x in row.iter_mut() {
                *x *= scale;
            }
            dq.put(p0 + r, row);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn forward_head_avx2(out: RowSink, lse: &mut [f32], sc: &mut HeadScratch, layout: &BlockLayout) {
    forward_head_body::<true, false>(out, lse, sc, layout)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn backward_head_avx2(dq: RowSink, lse: &[f32], sc: &mut HeadScratch, layout: &BlockLayout) {
    backward_head_body::<true, false>(dq, lse, sc, layout)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
fn forward_head_avx512(out: RowSink, lse: &mut [f32], sc: &mut HeadScratch, layout: &BlockLayout) {
    forward_head_body::<true, true>(out, lse, sc, layout)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
fn backward_head_avx512(dq: RowSink, lse: &[f32], sc: &mut HeadScratch, layout: &BlockLayout) {
    backward_head_body::<true, true>(dq, lse, sc, layout)
}

fn forward_head(
    isa: Isa,
    out: RowSink,
    lse: &mut [f32],
    sc: &mut HeadScratch,
    layout: &BlockLayout,
) {
    match isa {
        // SAFETY: the CPU has the features (checked in the guard).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if isa.available() => unsafe { forward_head_avx512(out, lse, sc, layout) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.available() => unsafe { forward_head_avx2(out, lse, sc, layout) },
        _ => forward_head_body::<false, false>(out, lse, sc, layout),
    }
}

fn backward_head(isa: Isa, dq: RowSink, lse: &[f32], sc: &mut HeadScratch, layout: &BlockLayout) {
    match isa {
        // SAFETY: the CPU has the features (checked in the guard).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if isa.available() => unsafe { backward_head_avx512(dq, lse, sc, layout) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.available() => unsafe { backward_head_avx2(dq, lse, sc, layout) },
        _ => backward_head_body::<false, false>(dq, lse, sc, layout),
    }
}

// ---------------------------------------------------------------------------------------------
// Public entry points.

/// Validated dimensions.
#[derive(Clone, Copy)]
struct Dims {
    t: usize,
    hs: usize,
    c: usize,
}

/// Checks the dimensions against the layout and computes `C`, without overflow panics.
fn check_dims(
    op: &'static str,
    layout: &BlockLayout,
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
) -> Result<Dims> {
    let shape = |what: String| KernelError::Shape { op, what };
    if t != layout.seq_len() {
        return Err(shape(format!(
            "t {t} differs from the layout's sequence length {}",
            layout.seq_len()
        )));
    }
    if nh == 0 || hs == 0 {
        return Err(shape(format!(
            "heads {nh} and head size {hs} must be non-zero"
        )));
    }
    let c = nh.checked_mul(hs);
    let total = c
        .and_then(|c| c.checked_mul(3))
        .and_then(|c3| c3.checked_mul(t))
        .and_then(|n| n.checked_mul(b));
    match (c, total) {
        (Some(c), Some(_)) => Ok(Dims { t, hs, c }),
        _ => Err(shape(format!("B {b} × T {t} × 3 × {nh} × {hs} overflows"))),
    }
}

/// `out[b, t, h·HS..(h+1)·HS] = softmax over allowed keys of (q·k/sqrt(HS)) · v`, and `lse[b, h, t]`
/// the log-sum-exp of the scaled scores of that row. `out` and `lse` are overwritten.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    out: &mut [f32],
    lse: &mut [f32],
    qkv: &[f32],
    layout: &BlockLayout,
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
) -> Result<()> {
    forward_with(Isa::best(), out, lse, qkv, layout, b, t, nh, hs)
}

/// [`attention_forward`] with the inner loops compiled for `isa`.
#[allow(clippy::too_many_arguments)]
fn forward_with(
    isa: Isa,
    out: &mut [f32],
    lse: &mut [f32],
    qkv: &[f32],
    layout: &BlockLayout,
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
) -> Result<()> {
    const OP: &str = "attention_forward";
    let dims = check_dims(OP, layout, b, t, nh, hs)?;
    let c = dims.c;
    check_len(OP, "qkv", qkv.len(), b * t * 3 * c)?;
    check_len(OP, "out", out.len(), b * t * c)?;
    check_len(OP, "lse", lse.len(), b * nh * t)?;

    let out = RowSink::shared(out);
    lse.par_chunks_mut(t).enumerate().for_each(|(bh, lse_bh)| {
        HeadScratch::with(layout, hs, false, |sc| {
            let (bi, h) = (bh / nh, bh % nh);
            sc.gather_qkv(qkv, bi, h, dims, false);
            // SAFETY: task (bi, h) writes only columns h·HS..(h+1)·HS of batch bi's rows.
            let sink = unsafe { out.at(bi * t * c + h * hs, c) };
            forward_head(isa, sink, lse_bh, sc, layout);
        })
    });
    Ok(())
}

/// Gradient of [`attention_forward`] with respect to `qkv`, written into `dqkv` (`[B, T, 3C]`,
/// overwritten). Recomputes the probabilities from `qkv` and the saved `lse`; `out` is the forward
/// output (used for `D = rowsum(dO ∘ O)`).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    out: &[f32],
    lse: &[f32],
    layout: &BlockLayout,
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
) -> Result<()> {
    backward_with(Isa::best(), dqkv, dout, qkv, out, lse, layout, b, t, nh, hs)
}

/// [`attention_backward`] with the inner loops compiled for `isa`.
#[allow(clippy::too_many_arguments)]
fn backward_with(
    isa: Isa,
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    out: &[f32],
    lse: &[f32],
    layout: &BlockLayout,
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
) -> Result<()> {
    const OP: &str = "attention_backward";
    let dims = check_dims(OP, layout, b, t, nh, hs)?;
    let c = dims.c;
    check_len(OP, "dqkv", dqkv.len(), b * t * 3 * c)?;
    check_len(OP, "dout", dout.len(), b * t * c)?;
    check_len(OP, "qkv", qkv.len(), b * t * 3 * c)?;
    check_len(OP, "out", out.len(), b * t * c)?;
    check_len(OP, "lse", lse.len(), b * nh * t)?;

    let dqkv = RowSink::shared(dqkv);
    lse.par_chunks(t).enumerate().for_each(|(bh, lse_bh)| {
        HeadScratch::with(layout, hs, true, |sc| {
            let (bi, h) = (bh / nh, bh % nh);
            sc.gather_qkv(qkv, bi, h, dims, true);
            sc.gather_dout(dout, out, bi, h, dims);
            let base = bi * t * 3 * c + h * hs;
            // SAFETY: task (bi, h) writes only head h's columns of the q, k and v parts of batch
            // bi's rows (offsets 0, C and 2C below).
            let (dq, dk, dv) = unsafe {
                (
                    dqkv.at(base, 3 * c),
                    dqkv.at(base + c, 3 * c),
                    dqkv.at(base + 2 * c, 3 * c),
                )
            };
            backward_head(isa, dq, lse_bh, sc, layout);
            for (p, (dk_row, dv_row)) in sc
                .dk
                .chunks_exact(hs)
                .zip(sc.dv.chunks_exact(hs))
                .enumerate()
            {
                dk.put(p, dk_row);
                dv.put(p, dv_row);
            }
        })
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, dot, numeric_grad, rand_vec};

    const KINDS: [MaskKind; 4] = [
        MaskKind::Row,
        MaskKind::Column,
        MaskKind::Conv { kernel: 11 },
        MaskKind::Conv { kernel: 3 },
    ];

    /// (text_len, grid) geometries, including ones where blocks do not divide T.
    const GEOMETRIES: [(usize, usize); 6] = [(4, 4), (5, 3), (32, 8), (7, 5), (0, 6), (9, 1)];

    #[test]
    fn attention_layout_matches_reference() {
        for &(tt, g) in &GEOMETRIES {
            for kind in KINDS {
                for block in [1, 4, 8, 16, 7, 64] {
                    let l = BlockLayout::new(tt, g, kind, block).unwrap();
                    let t = tt + g * g;
                    assert_eq!(l.seq_len(), t);
                    let mut count = 0u64;
                    for p in 0..t {
                        for q in 0..t {
                            let want = allowed_reference(tt, g, kind, p, q);
                            assert_eq!(
                                l.allowed(p, q),
                                want,
                                "{kind:?} tt {tt} g {g} block {block} p {p} q {q}"
                            );
                            count += u64::from(want);
                        }
                    }
                    assert_eq!(
                        l.allowed_pairs(),
                        count,
                        "{kind:?} tt {tt} g {g} block {block}"
                    );
                    // Each query block lists exactly the key blocks holding an allowed pair, sorted,
                    // and an entry is full iff all its pairs are allowed.
                    let mut n_entries = 0;
                    for qb in 0..l.num_blocks() {
                        let listed: Vec<usize> =
                            l.key_blocks(qb).iter().map(|e| e.key_block).collect();
                        let pairs = |kb: usize| {
                            let ps = qb * block..qb * block + l.block_len(qb);
                            ps.flat_map(|p| {
                                (kb * block..kb * block + l.block_len(kb)).map(move |q| (p, q))
                            })
                            .map(|(p, q)| allowed_reference(tt, g, kind, p, q))
                            .collect::<Vec<_>>()
                        };
                        let expected: Vec<usize> = (0..l.num_blocks())
                            .filter(|&kb| pairs(kb).iter().any(|&a| a))
                            .collect();
                        assert_eq!(
                            listed, expected,
                            "{kind:?} tt {tt} g {g} block {block} qb {qb}"
                        );
                        for e in l.key_blocks(qb) {
                            assert_eq!(e.mask.is_none(), pairs(e.key_block).iter().all(|&a| a));
                        }
                        n_entries += listed.len();
                    }
                    assert_eq!(l.nonzero_blocks(), n_entries);
                }
            }
        }
    }

    #[test]
    fn attention_mask_hand_checked_facts() {
        // Row, G = 4, no text: image 9 attends 5 (9 − 5 = 4 = G) but not 4.
        assert!(allowed_reference(0, 4, MaskKind::Row, 9, 5));
        assert!(!allowed_reference(0, 4, MaskKind::Row, 9, 4));
        assert!(allowed_reference(0, 4, MaskKind::Row, 9, 9));
        // Same with 3 text positions in front.
        assert!(allowed_reference(3, 4, MaskKind::Row, 12, 8));
        assert!(!allowed_reference(3, 4, MaskKind::Row, 12, 7));
        // Column, G = 4: image 9 (row 2, col 1) attends 1 and 5 and itself, nothing else.
        let col: Vec<usize> = (0..16)
            .filter(|&j| allowed_reference(0, 4, MaskKind::Column, 9, j))
            .collect();
        assert_eq!(col, vec![1, 5, 9]);
        // Conv 3, G = 4: image 5 (row 1, col 1) attends its 3×3 neighbourhood up to itself.
        let conv: Vec<usize> = (0..16)
            .filter(|&j| allowed_reference(0, 4, MaskKind::Conv { kernel: 3 }, 5, j))
            .collect();
        assert_eq!(conv, vec![0, 1, 2, 4, 5]);
        // Conv 3 does not wrap around: image 4 (row 1, col 0) does not attend 3 (row 0, col 3).
        assert!(!allowed_reference(0, 4, MaskKind::Conv { kernel: 3 }, 4, 3));
        for kind in KINDS {
            // A text query never attends a later position, and attends every earlier one.
            for p in 0..5 {
                for q in 0..21 {
                    assert_eq!(allowed_reference(5, 4, kind, p, q), q <= p);
                }
            }
            // An image query attends all text, and never a later image position.
            for p in 5..21 {
                for q in 0..5 {
                    assert!(allowed_reference(5, 4, kind, p, q));
                }
                for q in p + 1..21 {
                    assert!(!allowed_reference(5, 4, kind, p, q));
                }
                assert!(allowed_reference(5, 4, kind, p, p));
            }
        }
    }

    #[test]
    fn attention_layer_mask_kind_rule() {
        use MaskKind::*;
        let c = Conv { kernel: 11 };
        let got: Vec<MaskKind> = (0..8).map(|l| layer_mask_kind(l, 8, 11)).collect();
        assert_eq!(got, vec![Row, Column, Row, Row, Row, Column, Row, c]);
        assert_eq!(layer_mask_kind(0, 1, 5), Conv { kernel: 5 });
    }

    #[test]
    fn attention_layout_rejects_bad_arguments() {
        assert!(BlockLayout::new(4, 4, MaskKind::Row, 0).is_err());
        assert!(BlockLayout::new(4, 4, MaskKind::Row, MAX_BLOCK + 1).is_err());
        assert!(BlockLayout::new(4, 4, MaskKind::Conv { kernel: 4 }, 8).is_err());
        assert!(BlockLayout::new(4, 4, MaskKind::Conv { kernel: 0 }, 8).is_err());
        assert!(BlockLayout::new(0, 0, MaskKind::Row, 8).is_err());
        assert!(BlockLayout::new(4, usize::MAX, MaskKind::Row, 8).is_err());
    }

    /// Dense f64 reference: returns (out [B,T,C], lse [B,NH,T], P [B,NH,T,T]).
    fn dense_forward(
        qkv: &[f32],
        tt: usize,
        g: usize,
        kind: MaskKind,
        b: usize,
        nh: usize,
        hs: usize,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let t = tt + g * g;
        let c = nh * hs;
        let scale = 1.0 / (hs as f64).sqrt();
        let at = |bi: usize, p: usize, col: usize| qkv[(bi * t + p) * 3 * c + col] as f64;
        let mut out = vec![0.0; b * t * c];
        let mut lse = vec![0.0; b * nh * t];
        let mut probs = vec![0.0; b * nh * t * t];
        for bi in 0..b {
            for h in 0..nh {
                for p in 0..t {
                    let mut s = vec![f64::NEG_INFINITY; t];
                    for (q, sq) in s.iter_mut().enumerate() {
                        if allowed_reference(tt, g, kind, p, q) {
                            *sq = scale
                                * (0..hs)
                                    .map(|d| at(bi, p, h * hs + d) * at(bi, q, c + h * hs + d))
                                    .sum::<f64>();
                        }
                    }
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                    lse[(bi * nh + h) * t + p] = m + z.ln();
                    for q in 0..t {
                        let pq = (s[q] - m).exp() / z;
                        probs[((bi * nh + h) * t + p) * t + q] = pq;
                        for d in 0..hs {
                            out[(bi * t + p) * c + h * hs + d] +=
                                pq * at(bi, q, 2 * c + h * hs + d);
                        }
                    }
                }
            }
        }
        (out, lse, probs)
    }

    /// Dense f64 analytic gradient of `sum(dout ∘ out)` with respect to qkv.
    #[allow(clippy::too_many_arguments)]
    fn dense_backward(
        dout: &[f32],
        qkv: &[f32],
        probs: &[f64],
        t: usize,
        b: usize,
        nh: usize,
        hs: usize,
    ) -> Vec<f64> {
        let c = nh * hs;
        let scale = 1.0 / (hs as f64).sqrt();
        let at = |bi: usize, p: usize, col: usize| qkv[(bi * t + p) * 3 * c + col] as f64;
        let mut g = vec![0.0; b * t * 3 * c];
        for bi in 0..b {
            for h in 0..nh {
                let pr = |p: usize, q: usize| probs[((bi * nh + h) * t + p) * t + q];
                let dov = |p: usize, d: usize| dout[(bi * t + p) * c + h * hs + d] as f64;
                for p in 0..t {
                    let dp: Vec<f64> = (0..t)
                        .map(|q| {
                            (0..hs)
                                .map(|d| dov(p, d) * at(bi, q, 2 * c + h * hs + d))
                                .sum()
                        })
                        .collect();
                    let delta: f64 = (0..t).map(|q| pr(p, q) * dp[q]).sum();
                    for q in 0..t {
                        let ds = pr(p, q) * (dp[q] - delta);
                        for d in 0..hs {
                            g[(bi * t + p) * 3 * c + h * hs + d] +=
                                scale * ds * at(bi, q, c + h * hs + d);
                            g[(bi * t + q) * 3 * c + c + h * hs + d] +=
                                scale * ds * at(bi, p, h * hs + d);
                            g[(bi * t + q) * 3 * c + 2 * c + h * hs + d] += pr(p, q) * dov(p, d);
                        }
                    }
                }
            }
        }
        g
    }

    fn to_f64(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&v| v as f64).collect()
    }

    #[test]
    fn attention_forward_matches_dense_reference() {
        let (b, nh, hs) = (2, 2, 8);
        for &(tt, g) in &[(4, 4), (5, 3), (7, 5), (3, 6), (0, 5)] {
            for kind in KINDS {
                for block in [4, 7, DEFAULT_BLOCK] {
                    let t = tt + g * g;
                    let layout = BlockLayout::new(tt, g, kind, block).unwrap();
                    let qkv = rand_vec(b * t * 3 * nh * hs, 2.0, 7 + t as u64);
                    let mut out = vec![f32::NAN; b * t * nh * hs];
                    let mut lse = vec![f32::NAN; b * nh * t];
                    attention_forward(&mut out, &mut lse, &qkv, &layout, b, t, nh, hs).unwrap();
                    let (want_out, want_lse, _) = dense_forward(&qkv, tt, g, kind, b, nh, hs);
                    let what = format!("{kind:?} tt {tt} g {g} block {block}");
                    assert_close(&format!("out {what}"), &to_f64(&out), &want_out, 1e-5, 1e-5);
                    assert_close(&format!("lse {what}"), &to_f64(&lse), &want_lse, 1e-5, 1e-5);
                }
            }
        }
    }

    #[test]
    fn attention_backward_matches_dense_reference() {
        let (b, nh, hs) = (2, 2, 8);
        for &(tt, g) in &[(4, 4), (5, 3), (7, 5), (0, 5)] {
            for kind in KINDS {
                for block in [4, 7, DEFAULT_BLOCK] {
                    let t = tt + g * g;
                    let c = nh * hs;
                    let layout = BlockLayout::new(tt, g, kind, block).unwrap();
                    let qkv = rand_vec(b * t * 3 * c, 1.5, 11 + t as u64);
                    let dout = rand_vec(b * t * c, 1.0, 13 + t as u64);
                    let mut out = vec![0.0; b * t * c];
                    let mut lse = vec![0.0; b * nh * t];
                    attention_forward(&mut out, &mut lse, &qkv, &layout, b, t, nh, hs).unwrap();
                    let mut dqkv = vec![f32::NAN; b * t * 3 * c]; // overwritten, never read
                    attention_backward(&mut dqkv, &dout, &qkv, &out, &lse, &layout, b, t, nh, hs)
                        .unwrap();
                    let (_, _, probs) = dense_forward(&qkv, tt, g, kind, b, nh, hs);
                    let want = dense_backward(&dout, &qkv, &probs, t, b, nh, hs);
                    let what = format!("dqkv {kind:?} tt {tt} g {g} block {block}");
                    assert_close(&what, &to_f64(&dqkv), &want, 1e-5, 1e-4);
                }
            }
        }
    }

    /// Every instruction set this CPU offers (the generic loops always), with head sizes and blocks
    /// that are multiples of the 16-wide register tile, so that every block product runs its fast
    /// path (the tests above mostly exercise the remainder path), and some that are not.
    #[test]
    fn attention_every_isa_matches_dense_reference() {
        let (b, nh) = (1, 2);
        let isas: Vec<Isa> = Isa::ALL.into_iter().filter(|isa| isa.available()).collect();
        assert!(isas.contains(&Isa::Generic) && isas.contains(&Isa::best()));
        for &(tt, g, hs) in &[(7, 5, 16), (16, 6, 32), (5, 7, 48), (0, 8, 16), (4, 4, 8)] {
            for kind in KINDS {
                for block in [16, 32, 64, 5] {
                    let t = tt + g * g;
                    let c = nh * hs;
                    let layout = BlockLayout::new(tt, g, kind, block).unwrap();
                    let qkv = rand_vec(b * t * 3 * c, 1.5, 31 + t as u64);
                    let dout = rand_vec(b * t * c, 1.0, 37 + t as u64);
                    let (want_out, want_lse, probs) = dense_forward(&qkv, tt, g, kind, b, nh, hs);
                    let want_dqkv = dense_backward(&dout, &qkv, &probs, t, b, nh, hs);
                    for &isa in &isas {
                        let mut out = vec![0.0; b * t * c];
                        let mut lse = vec![0.0; b * nh * t];
                        forward_with(isa, &mut out, &mut lse, &qkv, &layout, b, t, nh, hs).unwrap();
                        let mut dqkv = vec![f32::NAN; b * t * 3 * c];
                        backward_with(
                            isa, &mut dqkv, &dout, &qkv, &out, &lse, &layout, b, t, nh, hs,
                        )
                        .unwrap();
                        let what = format!("{isa:?} {kind:?} tt {tt} g {g} hs {hs} block {block}");
                        assert_close(&format!("out {what}"), &to_f64(&out), &want_out, 1e-5, 1e-5);
                        assert_close(&format!("lse {what}"), &to_f64(&lse), &want_lse, 1e-5, 1e-5);
                        assert_close(
                            &format!("dqkv {what}"),
                            &to_f64(&dqkv),
                            &want_dqkv,
                            2e-5,
                            1e-4,
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn attention_backward_matches_finite_differences() {
        // Tiny enough to check every entry of dqkv; block 5 does not divide T = 3 + 9 = 12.
        let (tt, g, b, nh, hs) = (3, 3, 1, 2, 4);
        let t = tt + g * g;
        let c = nh * hs;
        for kind in KINDS {
            for block in [5, 16] {
                let layout = BlockLayout::new(tt, g, kind, block).unwrap();
                let mut qkv = rand_vec(b * t * 3 * c, 1.0, 21);
                let w = rand_vec(b * t * c, 1.0, 22);
                let mut out = vec![0.0; b * t * c];
                let mut lse = vec![0.0; b * nh * t];
                attention_forward(&mut out, &mut lse, &qkv, &layout, b, t, nh, hs).unwrap();
                let mut dqkv = vec![0.0; b * t * 3 * c];
                attention_backward(&mut dqkv, &w, &qkv, &out, &lse, &layout, b, t, nh, hs).unwrap();
                let numeric: Vec<f64> = (0..qkv.len())
                    .map(|i| {
                        numeric_grad(&mut qkv, i, 1e-2, |x| {
                            let mut o = vec![0.0; b * t * c];
                            let mut l = vec![0.0; b * nh * t];
                            attention_forward(&mut o, &mut l, x, &layout, b, t, nh, hs).unwrap();
                            dot(&w, &o)
                        })
                    })
                    .collect();
                assert_close(
                    &format!("dqkv {kind:?} block {block}"),
                    &to_f64(&dqkv),
                    &numeric,
                    2e-3,
                    1e-2,
                );
            }
        }
    }

    #[test]
    fn attention_rejects_bad_lengths() {
        let (tt, g, b, nh, hs) = (4, 4, 2, 2, 8);
        let t = tt + g * g;
        let c = nh * hs;
        let layout = BlockLayout::new(tt, g, MaskKind::Row, 8).unwrap();
        let qkv = vec![0.0; b * t * 3 * c];
        let mut out = vec![0.0; b * t * c];
        let mut lse = vec![0.0; b * nh * t];
        let mut dqkv = vec![0.0; b * t * 3 * c];
        let dout = vec![0.0; b * t * c];
        assert!(attention_forward(&mut out, &mut lse, &qkv[1..], &layout, b, t, nh, hs).is_err());
        assert!(attention_forward(&mut out[1..], &mut lse, &qkv, &layout, b, t, nh, hs).is_err());
        assert!(attention_forward(&mut out, &mut lse[1..], &qkv, &layout, b, t, nh, hs).is_err());
        assert!(attention_forward(&mut out, &mut lse, &qkv, &layout, b, t + 1, nh, hs).is_err());
        assert!(attention_forward(&mut out, &mut lse, &qkv, &layout, b, t, 0, hs).is_err());
        assert!(
            attention_forward(&mut out, &mut lse, &qkv, &layout, usize::MAX, t, nh, hs).is_err()
        );
        assert!(attention_forward(&mut out, &mut lse, &qkv, &layout, b, t, nh, hs).is_ok());
        let ok = attention_backward(&mut dqkv, &dout, &qkv, &out, &lse, &layout, b, t, nh, hs);
        assert!(ok.is_ok());
        assert!(attention_backward(
            &mut dqkv[1..],
            &dout,
            &qkv,
            &out,
            &lse,
            &layout,
            b,
            t,
            nh,
            hs
        )
        .is_err());
        assert!(attention_backward(
            &mut dqkv,
            &dout[1..],
            &qkv,
            &out,
            &lse,
            &layout,
            b,
            t,
            nh,
            hs
        )
        .is_err());
        assert!(attention_backward(
            &mut dqkv,
            &dout,
            &qkv[1..],
            &out,
            &lse,
            &layout,
            b,
            t,
            nh,
            hs
        )
        .is_err());
        assert!(attention_backward(
            &mut dqkv,
            &dout,
            &qkv,
            &out[1..],
            &lse,
            &layout,
            b,
            t,
            nh,
            hs
        )
        .is_err());
        assert!(attention_backward(
            &mut dqkv,
            &dout,
            &qkv,
            &out,
            &lse[1..],
            &layout,
            b,
            t,
            nh,
            hs
        )
        .is_err());
        assert!(
            attention_backward(&mut dqkv, &dout, &qkv, &out, &lse, &layout, b, t, nh, 3).is_err()
        );
    }
}
