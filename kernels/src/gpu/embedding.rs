//! Launchers of `kernels/cuda/embedding.cu`: the input embeddings' forward pass and their
//! deterministic scatter-add backward, for [`Gpu`] over either runtime.
//!
//! The backward pass adds every table row's contributions in the CPU reference's order, so it
//! needs no atomics and matches the reference bit for bit. For the token tables the host builds
//! the index: the flat positions grouped by token id, each group in position order (a stable
//! sort of the batch's B·Tt or B·G² positions by id; O(n log n) on the host, independent of the
//! vocabulary size), uploaded with the ids. The ids are host data anyway (the loader's batch),
//! and are checked with [`check_ids`] before any launch.

use super::{as_i32, check_buf, Args, Gpu, LaunchCfg, Runtime};
use crate::embedding::{
    check_ids, check_tables, EmbedDims, EmbedGradBufs, EmbedTableBufs, EmbeddingOps,
};
use crate::error::Result;

/// Channels per block (blockIdx.y picks the chunk).
const CH_THREADS: usize = 128;

/// Token positions grouped by id: group k holds the flat `dout` rows of id `rows[k]`,
/// `positions[starts[k]..starts[k + 1]]`, in increasing order.
#[derive(Debug, PartialEq, Eq)]
struct TokenIndex {
    rows: Vec<u32>,
    starts: Vec<u32>,
    positions: Vec<u32>,
}

/// The index of `ids` [B, per], whose position p of batch row b is row `b·seq + offset + p` of
/// `dout`.
fn token_index(ids: &[u32], per: usize, seq: usize, offset: usize) -> TokenIndex {
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| ids[i]); // stable: equal ids keep position order
    let mut index = TokenIndex {
        rows: Vec::new(),
        starts: Vec::new(),
        positions: Vec::with_capacity(ids.len()),
    };
    for (j, &i) in order.iter().enumerate() {
        if j == 0 || ids[order[j - 1]] != ids[i] {
            index.rows.push(ids[i]);
            index.starts.push(j as u32);
        }
        index
            .positions
            .push(((i / per) * seq + offset + i % per) as u32);
    }
    index.starts.push(order.len() as u32);
    index
}

fn cfg(blocks: usize, c: usize, z: u32) -> LaunchCfg {
    LaunchCfg {
        grid: [blocks as u32, c.div_ceil(CH_THREADS) as u32, z],
        block: [CH_THREADS as u32, 1, 1],
        shared_bytes: 0,
    }
}

impl<R: Runtime> EmbeddingOps for Gpu<R> {
    fn embedding_forward(
        &self,
        out: &mut R::Buf<f32>,
        text: &[u32],
        image: &[u32],
        t: EmbedTableBufs<'_, Self>,
        d: &EmbedDims,
    ) -> Result<()> {
        const K: &str = "embedding_forward_f32";
        let rt = &self.0;
        let (c, seq) = (d.channels, d.seq_len());
        let lens = [
            t.text_emb,
            t.text_pos,
            t.image_emb,
            t.image_row,
            t.image_col,
        ]
        .map(|b| rt.len(b));
        check_tables(K, d, lens)?;
        check_buf(rt, K, "out", out, d.batch * seq * c)?;
        check_ids(d, text, image)?;
        let rows = as_i32(K, "B·T", d.batch * seq)?;
        as_i32(K, "B·T·C", d.batch * seq * c)?;
        if rows == 0 || c == 0 {
            return Ok(());
        }
        // An empty id list (Tt = 0 or G = 0) is never read: a null pointer, no empty upload.
        let ids = |v: &[u32]| (!v.is_empty()).then(|| rt.upload(v)).transpose();
        let (text_d, image_d) = (ids(text)?, ids(image)?);
        let args = Args::new()
            .ptr(rt.addr_mut(out))
            .ptr(text_d.as_ref().map_or(0, |b| rt.addr(b)))
            .ptr(image_d.as_ref().map_or(0, |b| rt.addr(b)))
            .ptr(rt.addr(t.text_emb))
            .ptr(rt.addr(t.text_pos))
            .ptr(rt.addr(t.image_emb))
            .ptr(rt.addr(t.image_row))
            .ptr(rt.addr(t.image_col))
            .i32(d.text_len as i32)
            .i32(d.grid as i32)
            .i32(c as i32);
        // SAFETY: the arguments are the kernel's; tables, out and ids were checked above
        // (every id indexes inside its table).
        unsafe { rt.launch(K, cfg(d.batch * seq, c, 1), &args) }
    }

    fn embedding_backward(
        &self,
        g: EmbedGradBufs<'_, Self>,
        dout: &R::Buf<f32>,
        text: &[u32],
        image: &[u32],
        d: &EmbedDims,
    ) -> Result<()> {
        const K: &str = "embedding_backward_tokens_f32";
        let rt = &self.0;
        let (c, tt, seq) = (d.channels, d.text_len, d.seq_len());
        let lens = [
            rt.len(g.text_emb),
            rt.len(g.text_pos),
            rt.len(g.image_emb),
            rt.len(g.image_row),
            rt.len(g.image_col),
        ];
        check_tables(K, d, lens)?;
        check_buf(rt, K, "dout", dout, d.batch * seq * c)?;
        check_ids(d, text, image)?;
        as_i32(K, "B·T·C", d.batch * seq * c)?;
        if d.batch * seq == 0 || c == 0 {
            return Ok(());
        }
        let (b, tt_i, g_i, c_i) = (d.batch as i32, tt as i32, d.grid as i32, c as i32);
        for (table, index) in [
            (g.text_emb, token_index(text, tt, seq, 0)),
            (g.image_emb, token_index(image, d.grid * d.grid, seq, tt)),
        ] {
            if index.rows.is_empty() {
                continue;
            }
            let rows = rt.upload(&index.rows)?;
            let starts = rt.upload(&index.starts)?;
            let positions = rt.upload(&index.positions)?;
            let args = Args::new()
                .ptr(rt.addr_mut(table))
                .ptr(rt.addr(dout))
                .ptr(rt.addr(&rows))
                .ptr(rt.addr(&starts))
                .ptr(rt.addr(&positions))
                .i32(c_i);
            // SAFETY: rows are ids inside the table (checked), positions rows of dout, starts
            // one more than rows and bounded by positions' length (built so).
            unsafe { rt.launch(K, cfg(index.rows.len(), c, 1), &args)? };
        }
        if tt > 0 {
            let args = Args::new()
                .ptr(rt.addr_mut(g.text_pos))
                .ptr(rt.addr(dout))
                .i32(b)
                .i32(tt_i)
                .i32(g_i)
                .i32(c_i);
            // SAFETY: text_pos is [Tt, C], dout [B, T, C] (checked).
            unsafe { rt.launch("embedding_backward_text_pos_f32", cfg(tt, c, 1), &args)? };
        }
        if d.grid > 0 {
            let args = Args::new()
                .ptr(rt.addr_mut(g.image_row))
                .ptr(rt.addr_mut(g.image_col))
                .ptr(rt.addr(dout))
                .i32(b)
                .i32(tt_i)
                .i32(g_i)
                .i32(c_i);
            // SAFETY: image_row and image_col are [G, C], dout [B, T, C] (checked).
            unsafe { rt.launch("embedding_backward_image_pos_f32", cfg(d.grid, c, 2), &args)? };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Cpu;
    use crate::gpu::{Emu, Schedule};
    use crate::testutil::rand_vec;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
    }

    /// Forward, then backward into gradients that start non-zero: out and the five gradients.
    fn run<D: EmbeddingOps>(dev: &D, d: &EmbedDims, text: &[u32], image: &[u32]) -> Vec<Vec<f32>> {
        let c = d.channels;
        let sizes = [d.text_rows, d.text_len, d.image_vocab, d.grid, d.grid].map(|r| r * c);
        let tabs: Vec<D::Buf<f32>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| dev.upload(&rand_vec(n, 1.0, i as u64)).unwrap())
            .collect();
        let n_out = d.batch * d.seq_len() * c;
        let mut out = dev.upload(&rand_vec(n_out, 5.0, 20)).unwrap();
        let t = EmbedTableBufs::<D> {
            text_emb: &tabs[0],
            text_pos: &tabs[1],
            image_emb: &tabs[2],
            image_row: &tabs[3],
            image_col: &tabs[4],
        };
        dev.embedding_forward(&mut out, text, image, t, d).unwrap();
        let mut gs: Vec<D::Buf<f32>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| dev.upload(&rand_vec(n, 1.0, 10 + i as u64)).unwrap())
            .collect();
        let dout = dev.upload(&rand_vec(n_out, 1.0, 21)).unwrap();
        let [g0, g1, g2, g3, g4] = &mut gs[..] else {
            unreachable!()
        };
        let g = EmbedGradBufs::<D> {
            text_emb: g0,
            text_pos: g1,
            image_emb: g2,
            image_row: g3,
            image_col: g4,
        };
        dev.embedding_backward(g, &dout, text, image, d).unwrap();
        let mut all = vec![dev.download(&out).unwrap()];
        all.extend(gs.iter().map(|g| dev.download(g).unwrap()));
        all
    }

    #[test]
    fn emulated_embeddings_match_the_cpu_reference_bit_for_bit() {
        // Channels that fill neither a warp nor a block (and more than one block); small
        // vocabularies so ids repeat within and across batch rows.
        for (k, &(batch, text_len, grid, channels)) in [
            (3usize, 5usize, 3usize, 37usize),
            (2, 2, 4, 130),
            (1, 0, 2, 8),
        ]
        .iter()
        .enumerate()
        {
            let d = EmbedDims {
                batch,
                text_len,
                grid,
                channels,
                text_rows: 4 + text_len,
                image_vocab: 5,
            };
            let text = ids(batch * text_len, d.text_rows, 30 + k as u64);
            let image = ids(batch * grid * grid, d.image_vocab, 40 + k as u64);
            let want = run(&Cpu, &d, &text, &image);
            crate::gpu::for_each_gpu!(s, dev, {
                let got = run(dev, &d, &text, &image);
                // The same f32 additions in the same order: exact.
                let names = [
                    "out",
                    "text_emb",
                    "text_pos",
                    "image_emb",
                    "image_row",
                    "image_col",
                ];
                for ((name, g), w) in names.iter().zip(&got).zip(&want) {
                    assert_eq!(g, w, "{name}: {d:?} {s:?}");
                }
            });
        }
    }

    #[test]
    fn token_index_groups_positions_by_id_in_order() {
        // B = 2, 3 ids per row, seq 5, the ids at offset 1.
        let idx = token_index(&[4, 1, 4, 1, 4, 0], 3, 5, 1);
        assert_eq!(idx.rows, vec![0, 1, 4]);
        assert_eq!(idx.starts, vec![0, 1, 3, 6]);
        assert_eq!(idx.positions, vec![8, 2, 6, 1, 3, 7]);
    }

    #[test]
    fn out_of_range_ids_and_bad_shapes_are_errors_before_any_launch() {
        let dev = Gpu(Emu::new(Schedule::Forward));
        let d = EmbedDims {
            batch: 1,
            text_len: 2,
            grid: 2,
            channels: 3,
            text_rows: 4,
            image_vocab: 3,
        };
        let tab = |rows: usize| vec![0.0f32; rows * 3];
        let (te, tp, ie, ir, ic) = (tab(4), tab(2), tab(3), tab(2), tab(2));
        let t = || EmbedTableBufs::<Gpu<Emu>> {
            text_emb: &te,
            text_pos: &tp,
            image_emb: &ie,
            image_row: &ir,
            image_col: &ic,
        };
        // A poisoned output: an error must leave it untouched (nothing launched).
        let mut out = vec![7.0f32; 6 * 3];
        let err = dev
            .embedding_forward(&mut out, &[0, 4], &[0; 4], t(), &d)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("text token 4") && err.contains("position 1"),
            "{err}"
        );
        let err = dev
            .embedding_forward(&mut out, &[0, 1], &[0, 0, 3, 0], t(), &d)
            .unwrap_err()
            .to_string();
        assert!(err.contains("image token 3"), "{err}");
        assert!(out.iter().all(|&v| v == 7.0));
        let mut short = vec![0.0f32; 6 * 3 - 1];
        let err = dev
            .embedding_forward(&mut short, &[0, 1], &[0; 4], t(), &d)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("embedding_forward_f32") && err.contains("`out`"),
            "{err}"
        );

        let (mut g0, mut g1, mut g2, mut g3, mut g4) = (tab(4), tab(2), tab(3), tab(2), tab(1));
        let g = EmbedGradBufs::<Gpu<Emu>> {
            text_emb: &mut g0,
            text_pos: &mut g1,
            image_emb: &mut g2,
            image_row: &mut g3,
            image_col: &mut g4,
        };
        let err = dev
            .embedding_backward(g, &vec![0.0; 18], &[0, 1], &[0; 4], &d)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`image_col`"), "{err}");
        let mut g4 = tab(2);
        let g = EmbedGradBufs::<Gpu<Emu>> {
            text_emb: &mut g0,
            text_pos: &mut g1,
            image_emb: &mut g2,
            image_row: &mut g3,
            image_col: &mut g4,
        };
        let err = dev
            .embedding_backward(g, &vec![1.0; 18], &[0, 9], &[0; 4], &d)
            .unwrap_err()
            .to_string();
        assert!(err.contains("text token 9"), "{err}");
        assert!(g0.iter().chain(&g1).chain(&g2).all(|&v| v == 0.0));
    }
}
