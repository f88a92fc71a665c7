//! The stage-2 transformer's input embeddings (docs/model.md §1):
//!
//! ```text
//! x[b, p]            = text_emb[text[b, p]] + text_pos[p]                        p < Tt
//! x[b, Tt + r·G + c] = image_emb[image[b, r·G + c]] + image_row[r] + image_col[c]
//! ```
//!
//! Shapes: `text` [B, Tt] with ids in [0, Vt + Tt) (caption tokens, then per-position padding
//! ids), `image` [B, G²] with ids in [0, Vi), `out` [B, T, C] with T = Tt + G². Backward
//! accumulates into the tables (parameter gradients) in a fixed order, so it is deterministic.
//!
//! [`EmbeddingOps`] runs them on a [`Device`]: the functions below on [`Cpu`], the kernels of
//! `kernels/cuda/embedding.cu` on a GPU. Token ids are host data (the loader's batch): every
//! device checks them with [`check_ids`] before anything runs; a GPU then copies them over.

use crate::device::{Cpu, Device};
use crate::error::{check_len, KernelError, Result};
use rayon::prelude::*;

/// The five embedding tables as buffers of device `D`.
pub struct EmbedTableBufs<'a, D: Device + ?Sized> {
    pub text_emb: &'a D::Buf<f32>,
    pub text_pos: &'a D::Buf<f32>,
    pub image_emb: &'a D::Buf<f32>,
    pub image_row: &'a D::Buf<f32>,
    pub image_col: &'a D::Buf<f32>,
}

/// The five table gradients as buffers of device `D` (accumulated into).
pub struct EmbedGradBufs<'a, D: Device + ?Sized> {
    pub text_emb: &'a mut D::Buf<f32>,
    pub text_pos: &'a mut D::Buf<f32>,
    pub image_emb: &'a mut D::Buf<f32>,
    pub image_row: &'a mut D::Buf<f32>,
    pub image_col: &'a mut D::Buf<f32>,
}

/// The input embeddings on a [`Device`] (CUDA: `kernels/cuda/embedding.cu`). `text` [B, Tt]
/// and `image` [B, G²] are host ids; an id out of range is an error before anything runs.
pub trait EmbeddingOps: Device {
    /// [`embedding_forward`]: `out` [B, T, C] overwritten.
    fn embedding_forward(
        &self,
        out: &mut Self::Buf<f32>,
        text: &[u32],
        image: &[u32],
        tables: EmbedTableBufs<'_, Self>,
        d: &EmbedDims,
    ) -> Result<()>;

    /// [`embedding_backward`]: `dout` [B, T, C] added into the table gradients, each row's
    /// contributions in (batch row, position) order.
    fn embedding_backward(
        &self,
        grads: EmbedGradBufs<'_, Self>,
        dout: &Self::Buf<f32>,
        text: &[u32],
        image: &[u32],
        d: &EmbedDims,
    ) -> Result<()>;
}

impl EmbeddingOps for Cpu {
    fn embedding_forward(
        &self,
        out: &mut Vec<f32>,
        text: &[u32],
        image: &[u32],
        t: EmbedTableBufs<'_, Self>,
        d: &EmbedDims,
    ) -> Result<()> {
        let tables = EmbedTables {
            text_emb: t.text_emb,
            text_pos: t.text_pos,
            image_emb: t.image_emb,
            image_row: t.image_row,
            image_col: t.image_col,
        };
        embedding_forward(out, text, image, tables, d)
    }

    fn embedding_backward(
        &self,
        g: EmbedGradBufs<'_, Self>,
        dout: &Vec<f32>,
        text: &[u32],
        image: &[u32],
        d: &EmbedDims,
    ) -> Result<()> {
        let grads = EmbedGrads {
            text_emb: g.text_emb,
            text_pos: g.text_pos,
            image_emb: g.image_emb,
            image_row: g.image_row,
            image_col: g.image_col,
        };
        embedding_backward(grads, dout, text, image, d)
    }
}

/// Sizes of the embedding problem.
#[derive(Clone, Copy, Debug)]
pub struct EmbedDims {
    pub batch: usize,
    pub text_len: usize,
    pub grid: usize,
    pub channels: usize,
    /// Rows of `text_emb`: Vt + Tt.
    pub text_rows: usize,
    /// Rows of `image_emb`: Vi.
    pub image_vocab: usize,
}

impl EmbedDims {
    pub fn seq_len(&self) -> usize {
        self.text_len + self.grid * self.grid
    }
}

/// The five embedding tables.
#[derive(Clone, Copy)]
pub struct EmbedTables<'a> {
    pub text_emb: &'a [f32],
    pub text_pos: &'a [f32],
    pub image_emb: &'a [f32],
    pub image_row: &'a [f32],
    pub image_col: &'a [f32],
}

/// Gradients of the five embedding tables (accumulated into).
pub struct EmbedGrads<'a> {
    pub text_emb: &'a mut [f32],
    pub text_pos: &'a mut [f32],
    pub image_emb: &'a mut [f32],
    pub image_row: &'a mut [f32],
    pub image_col: &'a mut [f32],
}

pub(crate) fn check_tables(op: &'static str, d: &EmbedDims, lens: [usize; 5]) -> Result<()> {
    let c = d.channels;
    check_len(op, "text_emb", lens[0], d.text_rows * c)?;
    check_len(op, "text_pos", lens[1], d.text_len * c)?;
    check_len(op, "image_emb", lens[2], d.image_vocab * c)?;
    check_len(op, "image_row", lens[3], d.grid * c)?;
    check_len(op, "image_col", lens[4], d.grid * c)
}

/// Checks every token id against its vocabulary, naming the first bad one.
pub fn check_ids(d: &EmbedDims, text: &[u32], image: &[u32]) -> Result<()> {
    const OP: &str = "embedding";
    check_len(OP, "text", text.len(), d.batch * d.text_len)?;
    check_len(OP, "image", image.len(), d.batch * d.grid * d.grid)?;
    let bad = |ids: &[u32], limit: usize, per: usize, what: &str| {
        ids.iter()
            .position(|&t| t as usize >= limit)
            .map(|i| KernelError::Shape {
                op: OP,
                what: format!(
                    "{what} token {} at batch row {}, position {} is out of range [0, {limit})",
                    ids[i],
                    i / per.max(1),
                    i % per.max(1)
                ),
            })
    };
    if let Some(e) = bad(text, d.text_rows, d.text_len, "text") {
        return Err(e);
    }
    if let Some(e) = bad(image, d.image_vocab, d.grid * d.grid, "image") {
        return Err(e);
    }
    Ok(())
}

pub fn embedding_forward(
    out: &mut [f32],
    text: &[u32],
    image: &[u32],
    t: EmbedTables,
    d: &EmbedDims,
) -> Result<()> {
    const OP: &str = "embedding_forward";
    let (c, tt, seq) = (d.channels, d.text_len, d.seq_len());
    check_tables(
        OP,
        d,
        [
            t.text_emb.len(),
            t.text_pos.len(),
            t.image_emb.len(),
            t.image_row.len(),
            t.image_col.len(),
        ],
    )?;
    check_len(OP, "out", out.len(), d.batch * seq * c)?;
    check_ids(d, text, image)?;
    if c == 0 || seq == 0 {
        return Ok(());
    }
    out.par_chunks_mut(seq * c).enumerate().for_each(|(b, x)| {
        for (p, row) in x.chunks_exact_mut(c).enumerate() {
            let (a, pos, extra): (&[f32], &[f32], Option<&[f32]>) = if p < tt {
                let id = text[b * tt + p] as usize;
                (&t.text_emb[id * c..][..c], &t.text_pos[p * c..][..c], None)
            } else {
                let i = p - tt;
                let id = image[b * d.grid * d.grid + i] as usize;
                let (r, col) = (i / d.grid, i % d.grid);
                (
                    &t.image_emb[id * c..][..c],
                    &t.image_row[r * c..][..c],
                    Some(&t.image_col[col * c..][..c]),
                )
            };
            for k in 0..c {
                row[k] = a[k] + pos[k] + extra.map_or(0.0, |e| e[k]);
            }
        }
    });
    Ok(())
}

/// Scatter-adds `dout` [B, T, C] into the table gradients.
pub fn embedding_backward(
    g: EmbedGrads,
    dout: &[f32],
    text: &[u32],
    image: &[u32],
    d: &EmbedDims,
) -> Result<()> {
    const OP: &str = "embedding_backward";
    let (c, tt, seq) = (d.channels, d.text_len, d.seq_len());
    check_tables(
        OP,
        d,
        [
            g.text_emb.len(),
            g.text_pos.len(),
            g.image_emb.len(),
            g.image_row.len(),
            g.image_col.len(),
        ],
    )?;
    check_len(OP, "dout", dout.len(), d.batch * seq * c)?;
    check_ids(d, text, image)?;
    let add = |dst: &mut [f32], src: &[f32]| {
        for (a, &v) in dst.iter_mut().zip(src) {
            *a += v;
        }
    };
    for b in 0..d.batch {
        for p in 0..seq {
            let dy = &dout[(b * seq + p) * c..][..c];
            if p < tt {
                let id = text[b * tt + p] as usize;
                add(&mut g.text_emb[id * c..][..c], dy);
                add(&mut g.text_pos[p * c..][..c], dy);
            } else {
                let i = p - tt;
                let id = image[b * d.grid * d.grid + i] as usize;
                add(&mut g.image_emb[id * c..][..c], dy);
                add(&mut g.image_row[(i / d.grid) * c..][..c], dy);
                add(&mut g.image_col[(i % d.grid) * c..][..c], dy);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, dot, rand_vec};

    fn dims() -> EmbedDims {
        EmbedDims {
            batch: 2,
            text_len: 3,
            grid: 2,
            channels: 4,
            text_rows: 5 + 3,
            image_vocab: 6,
        }
    }

    #[test]
    fn forward_reads_the_right_rows_and_gradients_match_finite_differences() {
        let d = dims();
        let c = d.channels;
        let text = [0u32, 7, 5, 4, 4, 6];
        let image = [5u32, 0, 1, 5, 2, 2, 3, 4];
        let mut tabs: Vec<Vec<f32>> = [d.text_rows, d.text_len, d.image_vocab, d.grid, d.grid]
            .iter()
            .enumerate()
            .map(|(i, &rows)| rand_vec(rows * c, 1.0, i as u64))
            .collect();
        let n_out = d.batch * d.seq_len() * c;
        let run = |tabs: &[Vec<f32>]| {
            let mut out = vec![0.0; n_out];
            let t = EmbedTables {
                text_emb: &tabs[0],
                text_pos: &tabs[1],
                image_emb: &tabs[2],
                image_row: &tabs[3],
                image_col: &tabs[4],
            };
            embedding_forward(&mut out, &text, &image, t, &d).unwrap();
            out
        };
        let out = run(&tabs);
        // Batch 1, image position 3 (row 1, col 1) holds image id 4.
        let p = d.text_len + 3;
        let want = tabs[2][4 * c] + tabs[3][c] + tabs[4][c];
        assert_eq!(out[(d.seq_len() + p) * c], want);

        let w = rand_vec(n_out, 1.0, 9);
        let mut grads: Vec<Vec<f32>> = tabs.iter().map(|t| vec![0.0; t.len()]).collect();
        {
            let [g0, g1, g2, g3, g4] = &mut grads[..] else {
                unreachable!()
            };
            let g = EmbedGrads {
                text_emb: g0,
                text_pos: g1,
                image_emb: g2,
                image_row: g3,
                image_col: g4,
            };
            embedding_backward(g, &w, &text, &image, &d).unwrap();
        }
        for k in 0..5 {
            let num: Vec<f64> = (0..tabs[k].len())
                .map(|i| {
                    let orig = tabs[k][i];
                    tabs[k][i] = orig + 1e-2;
                    let plus = dot(&w, &run(&tabs));
                    tabs[k][i] = orig - 1e-2;
                    let minus = dot(&w, &run(&tabs));
                    tabs[k][i] = orig;
                    (plus - minus) / 2e-2
                })
                .collect();
            let got: Vec<f64> = grads[k].iter().map(|&v| v as f64).collect();
            assert_close(&format!("table {k}"), &got, &num, 1e-3, 1e-3);
        }
    }

    #[test]
    fn out_of_range_ids_are_errors_naming_the_position() {
        let d = dims();
        let text = [0u32, 8, 5, 4, 4, 6]; // 8 ≥ Vt + Tt
        let image = [0u32; 8];
        let err = check_ids(&d, &text, &image).unwrap_err().to_string();
        assert!(
            err.contains("text token 8") && err.contains("position 1"),
            "{err}"
        );
        let err = check_ids(&d, &[0; 6], &[6; 8]).unwrap_err().to_string();
        assert!(err.contains("image token 6"), "{err}");
    }
}
