//! Launchers of `kernels/cuda/attention.cu`: block-sparse attention forward and backward for
//! [`Gpu`] over either runtime.
//!
//! The backward pass is two launches, with no atomics (deterministic): `backward_dq` per query
//! block (D = rowsum(dO ∘ O) into a scratch `[B, NH, T]` buffer, and dQ), then `backward_dkv`
//! per key block over the transposed table (dK, dV). Every element of `dqkv` is written by
//! exactly one block: every key block holds its diagonal pair, so it has at least one entry.
//!
//! The layout's tables are uploaded once per [`BlockLayout`] ([`GpuAttentionLayout`]), as `u32`
//! arrays built from the very table the CPU reference walks, so both visit the same blocks with
//! the same intra-block masks by construction.
//!
//! Kernels are compiled per element type and block size: `attention_{op}_{f16,f32}_b{8,32}` for
//! op `forward`, `backward_dq`, `backward_dkv` (SIMT f32 arithmetic), and the tensor-core forward
//! `attention_forward_wmma_f16_b32` (WMMA m16n16k16, f16 in, f32 accumulate), which f16 at block
//! 32 uses unless the layout asks for SIMT ([`GpuAttentionLayout::with_tensor_cores`]).
//! Block 32 is the one the GPU uses ([`GPU_BLOCK`]); block 8 exists so that the emulator tests
//! exercise many blocks at small, fast shapes.

use super::{as_i32, check_buf, Args, Gpu, LaunchCfg, Runtime};
use crate::attention::{AttentionOps, BlockLayout};
use crate::device::Elem;
use crate::error::{KernelError, Result};

/// The block size the GPU runs (the layouts the model builds for CUDA use it).
pub const GPU_BLOCK: usize = 32;
/// Block sizes with compiled kernels.
pub const BLOCKS: [usize; 2] = [8, 32];
/// Largest head size (`ATT_MAX_HS` in the source: output columns per lane live in registers).
pub const MAX_HS: usize = 64;
/// Threads per block (`ATT_THREADS`).
const THREADS: u32 = 128;
/// Dynamic shared memory a block may use without opting in.
const SMEM_LIMIT: usize = 48 * 1024;
/// `row_mask` / `col_mask` of a block whose pairs are all allowed (`ATT_FULL`).
const FULL: u32 = u32::MAX;

/// A [`BlockLayout`]'s tables on a device (see the table comment in `attention.cu`).
pub struct GpuAttentionLayout<R: Runtime> {
    layout: BlockLayout,
    row_start: R::Buf<u32>,
    row_block: R::Buf<u32>,
    row_mask: R::Buf<u32>,
    col_start: R::Buf<u32>,
    col_block: R::Buf<u32>,
    col_mask: R::Buf<u32>,
    masks: R::Buf<u32>,
    tensor_cores: bool,
}

impl<R: Runtime> GpuAttentionLayout<R> {
    /// The host layout these tables were built from.
    pub fn layout(&self) -> &BlockLayout {
        &self.layout
    }

    /// Whether f16 attention at block 32 runs its tensor-core kernels (the default) or the SIMT
    /// ones (the fallback, and the f32 path's arithmetic).
    pub fn with_tensor_cores(mut self, on: bool) -> Self {
        self.tensor_cores = on;
        self
    }

    /// See [`with_tensor_cores`](Self::with_tensor_cores).
    pub fn tensor_cores(&self) -> bool {
        self.tensor_cores
    }
}

/// The layout's tables as `u32` arrays: (row_start, row_block, row_mask, col_start, col_block,
/// col_mask, masks).
#[allow(clippy::type_complexity)]
fn tables(
    layout: &BlockLayout,
) -> Result<(
    Vec<u32>,
    Vec<u32>,
    Vec<u32>,
    Vec<u32>,
    Vec<u32>,
    Vec<u32>,
    Vec<u32>,
)> {
    const OP: &str = "attention_layout";
    let u32_of = |what: &str, n: usize| {
        u32::try_from(n)
            .ok()
            .filter(|&v| v != FULL)
            .ok_or_else(|| KernelError::Shape {
                op: OP,
                what: format!("{what} {n} exceeds the kernels' 32-bit tables"),
            })
    };
    let nb = layout.num_blocks();
    let mut row_start = vec![0u32];
    let (mut row_block, mut row_mask) = (Vec::new(), Vec::new());
    // Per key block, its (query block, mask) entries in increasing query block order.
    let mut by_key: Vec<Vec<(u32, u32)>> = vec![Vec::new(); nb];
    for qb in 0..nb {
        for e in layout.key_blocks(qb) {
            let mask = match e.mask {
                None => FULL,
                Some(off) => u32_of("mask offset", off)?,
            };
            row_block.push(u32_of("block", e.key_block)?);
            row_mask.push(mask);
            by_key[e.key_block].push((qb as u32, mask));
        }
        row_start.push(u32_of("entries", row_block.len())?);
    }
    let mut col_start = vec![0u32];
    let (mut col_block, mut col_mask) = (Vec::new(), Vec::new());
    for entries in &by_key {
        for &(qb, mask) in entries {
            col_block.push(qb);
            col_mask.push(mask);
        }
        col_start.push(col_block.len() as u32);
    }
    // Each u64 word as (low, high); never empty, so that every buffer has an address.
    let mut masks: Vec<u32> = layout
        .masks()
        .iter()
        .flat_map(|&w| [w as u32, (w >> 32) as u32])
        .collect();
    if masks.is_empty() {
        masks.push(0);
    }
    Ok((
        row_start, row_block, row_mask, col_start, col_block, col_mask, masks,
    ))
}

/// Floats per row of a shared tile (`att_hsp` in the source).
fn hsp(hs: usize) -> usize {
    hs.div_ceil(32) * 32 + 4
}

/// Bytes of dynamic shared memory of `attention_forward_wmma_f16_b32` (see its comment): the f32
/// output and score tiles, the f16 q, k, v and probability tiles.
fn wmma_forward_bytes(hs: usize) -> usize {
    let (b, hs16) = (TC_BLOCK, hs.div_ceil(16) * 16);
    4 * (b * (hs16 + 4) + b * (b + 4)) + 2 * (3 * b * (hs16 + 8) + b * (b + 8))
}

/// Bytes of dynamic shared memory of `attention_backward_dq_wmma_f16_b32`: S and dP (f32),
/// q, dO, k, v and dS's high and low parts (f16).
fn wmma_dq_bytes(hs: usize) -> usize {
    let (b, hs16) = (TC_BLOCK, hs.div_ceil(16) * 16);
    4 * (2 * b * (b + 4)) + 2 * (4 * b * (hs16 + 8) + 2 * b * (b + 8))
}

/// Bytes of dynamic shared memory of `attention_backward_dkv_wmma_f16_b32`: Sᵀ, dPᵀ, lse and D
/// (f32), k, v, q, dO, and Pᵀ's and dSᵀ's high and low parts (f16).
fn wmma_dkv_bytes(hs: usize) -> usize {
    let (b, hs16) = (TC_BLOCK, hs.div_ceil(16) * 16);
    4 * (2 * b * (b + 4) + 2 * b) + 2 * (4 * b * (hs16 + 8) + 4 * b * (b + 8))
}

/// The block size of the tensor-core kernels (`ATT_TC_BLOCK`).
const TC_BLOCK: usize = 32;

/// The kernel `attention_{op}_{dtype}_b{block}`, or its tensor-core variant where one exists and
/// `tensor_cores`.
fn kernel_name<T: Elem>(
    op: &'static str,
    block: usize,
    tensor_cores: bool,
) -> Result<&'static str> {
    let name = match (op, T::DTYPE, block) {
        ("forward", "f16", TC_BLOCK) if tensor_cores => "attention_forward_wmma_f16_b32",
        ("backward_dq", "f16", TC_BLOCK) if tensor_cores => "attention_backward_dq_wmma_f16_b32",
        ("backward_dkv", "f16", TC_BLOCK) if tensor_cores => "attention_backward_dkv_wmma_f16_b32",
        ("forward", "f32", 8) => "attention_forward_f32_b8",
        ("forward", "f32", 32) => "attention_forward_f32_b32",
        ("forward", "f16", 8) => "attention_forward_f16_b8",
        ("forward", "f16", 32) => "attention_forward_f16_b32",
        ("backward_dq", "f32", 8) => "attention_backward_dq_f32_b8",
        ("backward_dq", "f32", 32) => "attention_backward_dq_f32_b32",
        ("backward_dq", "f16", 8) => "attention_backward_dq_f16_b8",
        ("backward_dq", "f16", 32) => "attention_backward_dq_f16_b32",
        ("backward_dkv", "f32", 8) => "attention_backward_dkv_f32_b8",
        ("backward_dkv", "f32", 32) => "attention_backward_dkv_f32_b32",
        ("backward_dkv", "f16", 8) => "attention_backward_dkv_f16_b8",
        ("backward_dkv", "f16", 32) => "attention_backward_dkv_f16_b32",
        (_, dtype, _) => {
            return Err(KernelError::Shape {
                op: "attention",
                what: format!(
                    "no attention_{op} kernel for element type {dtype} and block {block} \
                     (f16 or f32; blocks {BLOCKS:?})"
                ),
            })
        }
    };
    Ok(name)
}

/// Checked dimensions of one call.
struct Dims {
    /// Elements of `qkv` / `dqkv` and of `out` / `dout`, `lse`.
    qkv: usize,
    out: usize,
    lse: usize,
    t: i32,
    nh: i32,
    hs: i32,
    grid: [u32; 3],
}

fn check_dims(
    k: &'static str,
    layout: &BlockLayout,
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
) -> Result<Dims> {
    let shape = |what: String| KernelError::Shape { op: k, what };
    if t != layout.seq_len() {
        return Err(shape(format!(
            "t {t} differs from the layout's sequence length {}",
            layout.seq_len()
        )));
    }
    if nh == 0 || hs == 0 || hs > MAX_HS {
        return Err(shape(format!(
            "heads {nh} must be non-zero and head size {hs} in 1..={MAX_HS}"
        )));
    }
    let out = b
        .checked_mul(t)
        .and_then(|n| n.checked_mul(nh))
        .and_then(|n| n.checked_mul(hs));
    let qkv = out.and_then(|n| n.checked_mul(3));
    let (Some(out), Some(qkv)) = (out, qkv) else {
        return Err(shape(format!("B {b} × T {t} × 3 × {nh} × {hs} overflows")));
    };
    if b > 65535 || nh > 65535 {
        return Err(shape(format!(
            "batch {b} and heads {nh} must fit a grid dimension (≤ 65535)"
        )));
    }
    Ok(Dims {
        qkv,
        out,
        lse: b * nh * t,
        t: as_i32(k, "t", t)?,
        nh: as_i32(k, "nh", nh)?,
        hs: as_i32(k, "hs", hs)?,
        grid: [layout.num_blocks() as u32, nh as u32, b as u32],
    })
}

/// A launch of `grid` blocks with `floats` floats of dynamic shared memory, or an error if that
/// is over the limit.
fn cfg(k: &'static str, grid: [u32; 3], floats: usize) -> Result<LaunchCfg> {
    let bytes = floats * 4;
    if bytes > SMEM_LIMIT {
        return Err(KernelError::Shape {
            op: k,
            what: format!("needs {bytes} B of shared memory, over the {SMEM_LIMIT} B limit"),
        });
    }
    Ok(LaunchCfg {
        grid,
        block: [THREADS, 1, 1],
        shared_bytes: bytes as u32,
    })
}

impl<R: Runtime> AttentionOps for Gpu<R> {
    type Layout = GpuAttentionLayout<R>;

    fn attention_layout(&self, layout: &BlockLayout) -> Result<GpuAttentionLayout<R>> {
        let (rs, rb, rm, cs, cb, cm, masks) = tables(layout)?;
        let rt = &self.0;
        Ok(GpuAttentionLayout {
            layout: layout.clone(),
            row_start: rt.upload(&rs)?,
            row_block: rt.upload(&rb)?,
            row_mask: rt.upload(&rm)?,
            col_start: rt.upload(&cs)?,
            col_block: rt.upload(&cb)?,
            col_mask: rt.upload(&cm)?,
            masks: rt.upload(&masks)?,
            tensor_cores: true,
        })
    }

    fn attention_forward<T: Elem>(
        &self,
        out: &mut R::Buf<T>,
        lse: &mut R::Buf<f32>,
        qkv: &R::Buf<T>,
        layout: &GpuAttentionLayout<R>,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
    ) -> Result<()> {
        let block = layout.layout.block();
        let k = kernel_name::<T>("forward", block, layout.tensor_cores)?;
        let d = check_dims(k, &layout.layout, b, t, nh, hs)?;
        let rt = &self.0;
        check_buf(rt, k, "qkv", qkv, d.qkv)?;
        check_buf(rt, k, "out", out, d.out)?;
        check_buf(rt, k, "lse", lse, d.lse)?;
        let floats = if k.contains("wmma") {
            wmma_forward_bytes(hs) / 4
        } else {
            3 * block * hsp(hs) + block * block
        };
        let cfg = cfg(k, d.grid, floats)?;
        if b == 0 {
            return Ok(());
        }
        let args = Args::new()
            .ptr(rt.addr_mut(out))
            .ptr(rt.addr_mut(lse))
            .ptr(rt.addr(qkv))
            .ptr(rt.addr(&layout.row_start))
            .ptr(rt.addr(&layout.row_block))
            .ptr(rt.addr(&layout.row_mask))
            .ptr(rt.addr(&layout.masks))
            .i32(d.t)
            .i32(d.nh)
            .i32(d.hs);
        // SAFETY: the arguments are the kernel's; qkv, out and lse were checked against the
        // dimensions, and the tables were built from this layout, whose T the dimensions match.
        unsafe { rt.launch(k, cfg, &args) }
    }

    fn attention_backward<T: Elem>(
        &self,
        dqkv: &mut R::Buf<T>,
        dout: &R::Buf<T>,
        qkv: &R::Buf<T>,
        out: &R::Buf<T>,
        lse: &R::Buf<f32>,
        layout: &GpuAttentionLayout<R>,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
    ) -> Result<()> {
        let block = layout.layout.block();
        let kq = kernel_name::<T>("backward_dq", block, layout.tensor_cores)?;
        let kkv = kernel_name::<T>("backward_dkv", block, layout.tensor_cores)?;
        let d = check_dims(kq, &layout.layout, b, t, nh, hs)?;
        let rt = &self.0;
        check_buf(rt, kq, "dqkv", dqkv, d.qkv)?;
        check_buf(rt, kq, "dout", dout, d.out)?;
        check_buf(rt, kq, "qkv", qkv, d.qkv)?;
        check_buf(rt, kq, "out", out, d.out)?;
        check_buf(rt, kq, "lse", lse, d.lse)?;
        let tile = block * hsp(hs);
        let (floats_q, floats_kv) = if kq.contains("wmma") {
            (wmma_dq_bytes(hs) / 4, wmma_dkv_bytes(hs) / 4)
        } else {
            (
                4 * tile + block * block,
                4 * tile + 2 * block * block + 2 * block,
            )
        };
        let cfg_q = cfg(kq, d.grid, floats_q)?;
        let cfg_kv = cfg(kkv, d.grid, floats_kv)?;
        if b == 0 {
            return Ok(());
        }
        let mut d_buf = rt.take_scratch::<f32>("attention.d", d.lse)?;
        let args = Args::new()
            .ptr(rt.addr_mut(dqkv))
            .ptr(rt.addr_mut(&mut d_buf))
            .ptr(rt.addr(dout))
            .ptr(rt.addr(qkv))
            .ptr(rt.addr(out))
            .ptr(rt.addr(lse))
            .ptr(rt.addr(&layout.row_start))
            .ptr(rt.addr(&layout.row_block))
            .ptr(rt.addr(&layout.row_mask))
            .ptr(rt.addr(&layout.masks))
            .i32(d.t)
            .i32(d.nh)
            .i32(d.hs);
        // SAFETY: the arguments are the kernel's; every buffer was checked against the
        // dimensions (d_buf has lse's shape), the tables match the layout whose T was checked.
        unsafe { rt.launch(kq, cfg_q, &args)? };
        let args = Args::new()
            .ptr(rt.addr_mut(dqkv))
            .ptr(rt.addr(dout))
            .ptr(rt.addr(qkv))
            .ptr(rt.addr(lse))
            .ptr(rt.addr(&d_buf))
            .ptr(rt.addr(&layout.col_start))
            .ptr(rt.addr(&layout.col_block))
            .ptr(rt.addr(&layout.col_mask))
            .ptr(rt.addr(&layout.masks))
            .i32(d.t)
            .i32(d.nh)
            .i32(d.hs);
        // SAFETY: as above; this launch follows the first on the same stream (it reads d_buf).
        unsafe { rt.launch(kkv, cfg_kv, &args)? };
        rt.put_scratch("attention.d", d_buf);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::MaskKind;
    use crate::device::{narrow, widen, Cpu, Device};
    use crate::gpu::{Emu, Schedule};
    use crate::testutil::{close, rand_vec};

    const KINDS: [MaskKind; 3] = [
        MaskKind::Row,
        MaskKind::Column,
        MaskKind::Conv { kernel: 3 },
    ];

    /// A case: (text_len, grid, block, batch, heads, head size).
    type Case = (usize, usize, usize, usize, usize, usize);

    /// Every layout kind at the case's geometry, forward through `Cpu` and `Gpu(Emu(s))` for every
    /// schedule, on the same `T`-rounded inputs.
    fn forward_parity<T: Elem>(
        cases: &[Case],
        tensor_cores: bool,
        out_tol: (f32, f32),
        lse_tol: (f32, f32),
    ) {
        for &(tt, g, block, b, nh, hs) in cases {
            for kind in KINDS {
                let layout = BlockLayout::new(tt, g, kind, block).unwrap();
                let t = layout.seq_len();
                let qkv: Vec<T> = narrow(&rand_vec(b * t * 3 * nh * hs, 2.0, 5 + t as u64));
                let want = {
                    let l = Cpu.attention_layout(&layout).unwrap();
                    let mut out = vec![T::from_f32(7.0); b * t * nh * hs];
                    let mut lse = vec![7.0f32; b * nh * t];
                    Cpu.attention_forward(&mut out, &mut lse, &qkv, &l, b, t, nh, hs)
                        .unwrap();
                    (widen(&out).into_owned(), lse)
                };
                crate::gpu::for_each_gpu!(s, dev, {
                    let l = dev
                        .attention_layout(&layout)
                        .unwrap()
                        .with_tensor_cores(tensor_cores);
                    // Filled with a value the kernel must overwrite everywhere.
                    let mut out = dev
                        .upload(&vec![T::from_f32(7.0); b * t * nh * hs])
                        .unwrap();
                    let mut lse = dev.upload(&vec![7.0f32; b * nh * t]).unwrap();
                    let q = dev.upload(&qkv).unwrap();
                    dev.attention_forward(&mut out, &mut lse, &q, &l, b, t, nh, hs)
                        .unwrap();
                    let at = format!(
                        "{} {kind:?} tt {tt} g {g} block {block} hs {hs} tensor cores \
                         {tensor_cores} {s:?}",
                        T::DTYPE
                    );
                    let out = widen(&dev.download(&out).unwrap()).into_owned();
                    close(&format!("out {at}"), &out, &want.0, out_tol.0, out_tol.1);
                    let lse = dev.download(&lse).unwrap();
                    close(&format!("lse {at}"), &lse, &want.1, lse_tol.0, lse_tol.1);
                });
            }
        }
    }

    /// Block 8 cuts T = 8 + 36 = 44 into 6 blocks (the last partial), T = 5 + 16 = 21 into 3,
    /// T = 0 + 25 (no text) into 4; block 32 cuts T = 44 into 2. Head sizes below one warp,
    /// between one and two, and odd (padding columns inside a float4).
    const SMALL: [Case; 4] = [
        (8, 6, 8, 2, 2, 8),
        (5, 4, 8, 1, 2, 40),
        (0, 5, 8, 1, 1, 5),
        (8, 6, 32, 1, 1, 16),
    ];

    #[test]
    fn forward_matches_the_cpu_reference_in_f32() {
        // Same f32 inputs; only the summation order differs.
        forward_parity::<f32>(&SMALL, true, (2e-5, 2e-5), (2e-5, 2e-5));
    }

    #[test]
    fn forward_matches_the_cpu_reference_in_f16() {
        // Both sides compute in f32 from the same f16 inputs and round `out` to f16: values
        // that differ by f32 round-off may round one f16 step (2⁻¹⁰ relative) apart.
        forward_parity::<half::f16>(&SMALL, true, (1e-3, 2e-3), (2e-5, 2e-5));
    }

    /// Block 32 (the tensor-core kernels' block): T = 8 + 36 = 44 in 2 blocks, T = 0 + 81 in 3
    /// (the last of 17 rows); head sizes 40 (padded to 48 for the 16-wide tiles) and 64.
    const BLOCK32: [Case; 2] = [(8, 6, 32, 2, 2, 40), (0, 9, 32, 1, 1, 64)];

    #[test]
    fn forward_on_tensor_cores_matches_the_cpu_reference_in_f16() {
        // P is rounded to f16 for the P·V product (the reference keeps it in f32): a few 2⁻¹¹
        // relative steps more than the SIMT kernel's difference, within the same tolerance.
        forward_parity::<half::f16>(&BLOCK32, true, (1e-3, 2e-3), (2e-5, 2e-5));
    }

    #[test]
    fn forward_simt_fallback_matches_the_cpu_reference_in_f16() {
        forward_parity::<half::f16>(&BLOCK32, false, (1e-3, 2e-3), (2e-5, 2e-5));
    }

    /// The launcher picks the tensor-core forward for f16 at block 32 only, and not when asked for
    /// SIMT.
    #[test]
    fn tensor_core_kernels_are_chosen_for_f16_at_block_32() {
        use half::f16;
        assert_eq!(
            kernel_name::<f16>("forward", 32, true).unwrap(),
            "attention_forward_wmma_f16_b32"
        );
        assert_eq!(
            kernel_name::<f16>("forward", 32, false).unwrap(),
            "attention_forward_f16_b32"
        );
        assert_eq!(
            kernel_name::<f32>("forward", 32, true).unwrap(),
            "attention_forward_f32_b32"
        );
        assert_eq!(
            kernel_name::<f16>("forward", 8, true).unwrap(),
            "attention_forward_f16_b8"
        );
        assert_eq!(
            kernel_name::<f16>("backward_dq", 32, true).unwrap(),
            "attention_backward_dq_wmma_f16_b32"
        );
        assert_eq!(
            kernel_name::<f16>("backward_dkv", 32, false).unwrap(),
            "attention_backward_dkv_f16_b32"
        );
        // The tensor-core kernels' shared memory at the largest head size fits without opting in.
        for bytes in [wmma_forward_bytes, wmma_dq_bytes, wmma_dkv_bytes] {
            assert!(bytes(MAX_HS) <= SMEM_LIMIT);
        }
        assert_eq!(
            (
                wmma_forward_bytes(64),
                wmma_dq_bytes(64),
                wmma_dkv_bytes(64)
            ),
            (29_696, 32_768, 38_144)
        );
    }

    /// Backward through `Cpu` and `Gpu(Emu(s))` for every schedule, from the same inputs: `qkv`,
    /// `dout`, and `out`, `lse` of the CPU forward (so that only the backward is compared).
    fn backward_parity<T: Elem>(cases: &[Case], tensor_cores: bool, tol: (f32, f32)) {
        for &(tt, g, block, b, nh, hs) in cases {
            for kind in KINDS {
                let layout = BlockLayout::new(tt, g, kind, block).unwrap();
                let t = layout.seq_len();
                let qkv: Vec<T> = narrow(&rand_vec(b * t * 3 * nh * hs, 2.0, 9 + t as u64));
                let dout: Vec<T> = narrow(&rand_vec(b * t * nh * hs, 1.0, 10 + t as u64));
                let cl = Cpu.attention_layout(&layout).unwrap();
                let mut out = vec![T::default(); b * t * nh * hs];
                let mut lse = vec![0.0f32; b * nh * t];
                Cpu.attention_forward(&mut out, &mut lse, &qkv, &cl, b, t, nh, hs)
                    .unwrap();
                let mut want = vec![T::default(); b * t * 3 * nh * hs];
                Cpu.attention_backward(&mut want, &dout, &qkv, &out, &lse, &cl, b, t, nh, hs)
                    .unwrap();
                let want = widen(&want);
                crate::gpu::for_each_gpu!(s, dev, {
                    let l = dev
                        .attention_layout(&layout)
                        .unwrap()
                        .with_tensor_cores(tensor_cores);
                    // Filled with a value the kernels must overwrite everywhere.
                    let mut dqkv = dev
                        .upload(&vec![T::from_f32(7.0); b * t * 3 * nh * hs])
                        .unwrap();
                    let up = |v: &[T]| dev.upload(v).unwrap();
                    let (dq, q, o) = (up(&dout), up(&qkv), up(&out));
                    let lse = dev.upload(&lse).unwrap();
                    dev.attention_backward(&mut dqkv, &dq, &q, &o, &lse, &l, b, t, nh, hs)
                        .unwrap();
                    let at = format!(
                        "dqkv {} {kind:?} tt {tt} g {g} block {block} hs {hs} tensor cores \
                         {tensor_cores} {s:?}",
                        T::DTYPE
                    );
                    close(
                        &at,
                        &widen(&dev.download(&dqkv).unwrap()),
                        &want,
                        tol.0,
                        tol.1,
                    );
                });
            }
        }
    }

    #[test]
    fn backward_matches_the_cpu_reference_in_f32() {
        // Same f32 inputs; only the summation order differs (dS = P·(dP − D) cancels, so the
        // absolute tolerance is a little wider than the forward's).
        backward_parity::<f32>(&SMALL, true, (5e-5, 5e-5));
    }

    #[test]
    fn backward_matches_the_cpu_reference_in_f16() {
        // dqkv rounded to f16 on both sides: one f16 step (2⁻¹⁰ relative) plus the f32 round-off.
        backward_parity::<half::f16>(&SMALL, true, (1e-4, 2e-3));
    }

    #[test]
    fn backward_on_tensor_cores_matches_the_cpu_reference_in_f16() {
        backward_parity::<half::f16>(&BLOCK32, true, (1e-4, 2e-3));
    }

    #[test]
    fn backward_simt_fallback_matches_the_cpu_reference_in_f16() {
        backward_parity::<half::f16>(&BLOCK32, false, (1e-4, 2e-3));
    }

    /// The transposed table lists exactly the entries of the forward table, per key block in
    /// increasing query block order, with the same masks.
    #[test]
    fn transposed_table_holds_the_same_entries() {
        for kind in [
            MaskKind::Row,
            MaskKind::Column,
            MaskKind::Conv { kernel: 5 },
        ] {
            let layout = BlockLayout::new(8, 6, kind, 8).unwrap();
            let (rs, rb, rm, cs, cb, cm, masks) = tables(&layout).unwrap();
            let nb = layout.num_blocks();
            let mut forward = Vec::new();
            for qb in 0..nb {
                for e in rs[qb]..rs[qb + 1] {
                    forward.push((rb[e as usize], qb as u32, rm[e as usize]));
                }
            }
            let mut transposed = Vec::new();
            for kb in 0..nb {
                let qbs = &cb[cs[kb] as usize..cs[kb + 1] as usize];
                assert!(
                    qbs.windows(2).all(|w| w[0] < w[1]),
                    "{kind:?} key block {kb}"
                );
                assert!(
                    qbs.contains(&(kb as u32)),
                    "{kind:?}: key block {kb} lacks its diagonal"
                );
                for e in cs[kb]..cs[kb + 1] {
                    transposed.push((kb as u32, cb[e as usize], cm[e as usize]));
                }
            }
            forward.sort_unstable();
            assert_eq!(forward, transposed, "{kind:?}");
            let words: Vec<u64> = masks
                .chunks_exact(2)
                .map(|w| u64::from(w[0]) | u64::from(w[1]) << 32)
                .collect();
            assert_eq!(words, layout.masks(), "{kind:?}");
        }
    }

    /// The parity tests on a real GPU, at block 32 and the paper's T = 1280 with HS 64 (skipped,
    /// saying why, without a GPU; `TESSERA_REQUIRE_GPU=1` makes that a failure).
    #[test]
    fn cuda_matches_the_cpu_reference() {
        let Some(dev) = crate::gpu::cuda_for_tests() else {
            return;
        };
        let (b, nh, hs) = (2, 2, 64);
        for kind in [
            MaskKind::Row,
            MaskKind::Column,
            MaskKind::Conv { kernel: 11 },
        ] {
            for (tt, g) in [(256, 32), (8, 6)] {
                let layout = BlockLayout::new(tt, g, kind, GPU_BLOCK).unwrap();
                let t = layout.seq_len();
                let qkv: Vec<half::f16> = narrow(&rand_vec(b * t * 3 * nh * hs, 2.0, 3));
                let dout: Vec<half::f16> = narrow(&rand_vec(b * t * nh * hs, 1.0, 4));
                let cl = Cpu.attention_layout(&layout).unwrap();
                let mut out = vec![half::f16::ZERO; b * t * nh * hs];
                let mut lse = vec![0.0f32; b * nh * t];
                Cpu.attention_forward(&mut out, &mut lse, &qkv, &cl, b, t, nh, hs)
                    .unwrap();
                let mut dqkv = vec![half::f16::ZERO; b * t * 3 * nh * hs];
                Cpu.attention_backward(&mut dqkv, &dout, &qkv, &out, &lse, &cl, b, t, nh, hs)
                    .unwrap();

                let l = dev.attention_layout(&layout).unwrap();
                let (q, d) = (dev.upload(&qkv).unwrap(), dev.upload(&dout).unwrap());
                // Filled with a value the kernels must overwrite everywhere, as in the emulator
                // tests (zeros would hide unwritten elements whose reference is near 0).
                let sentinel = half::f16::from_f32(7.0);
                let mut g_out = dev.upload(&vec![sentinel; out.len()]).unwrap();
                let mut g_lse = dev.upload(&vec![7.0f32; lse.len()]).unwrap();
                dev.attention_forward(&mut g_out, &mut g_lse, &q, &l, b, t, nh, hs)
                    .unwrap();
                let at = format!("{kind:?} tt {tt} g {g}");
                let got = widen(&dev.download(&g_out).unwrap()).into_owned();
                close(&format!("out {at}"), &got, &widen(&out), 1e-3, 2e-3);
                // __expf on the GPU is an approximation: a few f32 steps more than the CPU's.
                close(
                    &format!("lse {at}"),
                    &dev.download(&g_lse).unwrap(),
                    &lse,
                    1e-4,
                    1e-5,
                );
                // The backward from the CPU's forward outputs, as in the emulator tests.
                let (o, ls) = (dev.upload(&out).unwrap(), dev.upload(&lse).unwrap());
                let mut g_dqkv = dev.upload(&vec![sentinel; dqkv.len()]).unwrap();
                dev.attention_backward(&mut g_dqkv, &d, &q, &o, &ls, &l, b, t, nh, hs)
                    .unwrap();
                let got = widen(&dev.download(&g_dqkv).unwrap()).into_owned();
                close(&format!("dqkv {at}"), &got, &widen(&dqkv), 2e-4, 4e-3);
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors_before_any_launch() {
        let dev = Gpu(Emu::new(Schedule::Forward));
        let (tt, g, b, nh, hs) = (4, 4, 2, 2, 8);
        let layout = BlockLayout::new(tt, g, MaskKind::Row, 8).unwrap();
        let l = dev.attention_layout(&layout).unwrap();
        let t = layout.seq_len();
        let qkv = vec![0.0f32; b * t * 3 * nh * hs];
        let mut out = vec![0.0f32; b * t * nh * hs];
        let mut lse = vec![0.0f32; b * nh * t];
        let err = |r: Result<()>| r.unwrap_err().to_string();
        let e =
            err(dev.attention_forward(&mut out, &mut lse, &qkv[1..].to_vec(), &l, b, t, nh, hs));
        assert!(
            e.contains("attention_forward_f32_b8") && e.contains("`qkv`"),
            "{e}"
        );
        let e =
            err(dev.attention_forward(&mut out, &mut lse[1..].to_vec(), &qkv, &l, b, t, nh, hs));
        assert!(e.contains("`lse`"), "{e}");
        let e = err(dev.attention_forward(&mut out, &mut lse, &qkv, &l, b, t + 1, nh, hs));
        assert!(e.contains("sequence length"), "{e}");
        let e = err(dev.attention_forward(&mut out, &mut lse, &qkv, &l, b, t, nh, 72));
        assert!(e.contains("head size 72"), "{e}");
        let e = err(dev.attention_forward(&mut out, &mut lse, &qkv, &l, usize::MAX, t, nh, hs));
        assert!(e.contains("overflows"), "{e}");
        let l7 = dev
            .attention_layout(&BlockLayout::new(tt, g, MaskKind::Row, 7).unwrap())
            .unwrap();
        let e = err(dev.attention_forward(&mut out, &mut lse, &qkv, &l7, b, t, nh, hs));
        assert!(e.contains("block 7"), "{e}");
        let mut out_u = vec![0u32; b * t * nh * hs];
        let qkv_u = vec![0u32; b * t * 3 * nh * hs];
        let e = err(dev.attention_forward(&mut out_u, &mut lse, &qkv_u, &l, b, t, nh, hs));
        assert!(e.contains("u32"), "{e}");
        // The right shapes run.
        dev.attention_forward(&mut out, &mut lse, &qkv, &l, b, t, nh, hs)
            .unwrap();
        let mut dqkv = vec![0.0f32; b * t * 3 * nh * hs];
        let dout = out.clone();
        let e = err(dev.attention_backward(
            &mut dqkv[1..].to_vec(),
            &dout,
            &qkv,
            &out,
            &lse,
            &l,
            b,
            t,
            nh,
            hs,
        ));
        assert!(
            e.contains("attention_backward_dq_f32_b8") && e.contains("`dqkv`"),
            "{e}"
        );
        let e = err(dev.attention_backward(
            &mut dqkv,
            &dout[1..].to_vec(),
            &qkv,
            &out,
            &lse,
            &l,
            b,
            t,
            nh,
            hs,
        ));
        assert!(e.contains("`dout`"), "{e}");
        let e = err(dev.attention_backward(
            &mut dqkv,
            &dout,
            &qkv,
            &out[1..].to_vec(),
            &lse,
            &l,
            b,
            t,
            nh,
            hs,
        ));
        assert!(e.contains("`out`"), "{e}");
        let e = err(dev.attention_backward(&mut dqkv, &dout, &qkv, &out, &lse, &l, b, t, nh, 72));
        assert!(e.contains("head size 72"), "{e}");
        dev.attention_backward(&mut dqkv, &dout, &qkv, &out, &lse, &l, b, t, nh, hs)
            .unwrap();
    }
}
