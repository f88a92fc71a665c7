//! The searches of `data-prep dedup` over L2-normalised embeddings (rows of D f32 values, cosine
//! = dot product):
//!
//! - [`best_matches`]: for every row of X its most similar row of Y, exact, by blocked products
//!   X_i · Y_jᵀ of `BLOCK` × `BLOCK` rows (f32 accumulation, `kernels::linear::matmul`);
//! - [`exact_pairs`]: every pair i < j of X with cosine ≥ t, by the blocked products of the upper
//!   triangle X_i · X_jᵀ (j ≥ i);
//! - [`hnsw_pairs`]: the same pairs, approximately: an HNSW index (`usearch`) of X and a search
//!   for each row's `k` nearest rows, of which those with cosine ≥ t are kept;
//! - [`components`]: union-find over the pairs; each record's representative is the lowest index
//!   of its connected component.

use anyhow::{anyhow, Result};
use kernels::linear::{matmul, MatRef};
use rayon::prelude::*;
use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

/// Rows per block of the exact products: a 2048 × 2048 f32 block of similarities is 16 MiB.
pub const BLOCK: usize = 2048;

/// Two records and their cosine similarity; `a < b` within one set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pair {
    pub a: u32,
    pub b: u32,
    pub sim: f32,
}

/// What a pair search found.
#[derive(Debug, Default)]
pub struct Found {
    /// Pairs with cosine ≥ the threshold, by (a, b).
    pub pairs: Vec<Pair>,
    /// The most similar pair below the threshold that the search saw (the margin), if any.
    pub closest_below: Option<Pair>,
    /// Similarities computed.
    pub compared: u64,
}

/// For every row of `x` [n, d], (index, cosine) of its most similar row of `y` [m, d] (the first
/// on a tie); `None` when `y` is empty.
pub fn best_matches(x: &[f32], y: &[f32], d: usize) -> Vec<Option<(u32, f32)>> {
    let (n, m) = (x.len() / d, y.len() / d);
    let mut best: Vec<Option<(u32, f32)>> = vec![None; n];
    let mut c = vec![0.0f32; BLOCK * BLOCK];
    for i0 in (0..n).step_by(BLOCK) {
        let ni = BLOCK.min(n - i0);
        for j0 in (0..m).step_by(BLOCK) {
            let nj = BLOCK.min(m - j0);
            let c = &mut c[..ni * nj];
            matmul(
                c,
                MatRef::new(&x[i0 * d..(i0 + ni) * d], ni, d),
                MatRef::new(&y[j0 * d..(j0 + nj) * d], nj, d).t(),
                false,
            )
            .expect("block shapes agree");
            best[i0..i0 + ni]
                .par_iter_mut()
                .zip(c.par_chunks_exact(nj))
                .for_each(|(b, row)| {
                    for (j, &s) in row.iter().enumerate() {
                        if b.is_none_or(|(_, bs)| s > bs) {
                            *b = Some(((j0 + j) as u32, s));
                        }
                    }
                });
        }
    }
    best
}

/// Every pair i < j of rows of `x` [n, d] with cosine ≥ `threshold`, exactly.
pub fn exact_pairs(x: &[f32], d: usize, threshold: f32) -> Found {
    let n = x.len() / d;
    let mut found = Found::default();
    let mut c = vec![0.0f32; BLOCK * BLOCK];
    for i0 in (0..n).step_by(BLOCK) {
        let ni = BLOCK.min(n - i0);
        for j0 in (i0..n).step_by(BLOCK) {
            let nj = BLOCK.min(n - j0);
            let c = &mut c[..ni * nj];
            matmul(
                c,
                MatRef::new(&x[i0 * d..(i0 + ni) * d], ni, d),
                MatRef::new(&x[j0 * d..(j0 + nj) * d], nj, d).t(),
                false,
            )
            .expect("block shapes agree");
            // Per row: its pairs above the threshold and its best pair below it.
            let rows: Vec<(Vec<Pair>, Option<Pair>, u64)> = c
                .par_chunks_exact(nj)
                .enumerate()
                .map(|(r, row)| {
                    let a = (i0 + r) as u32;
                    // On a diagonal block only the columns right of the diagonal.
                    let from = if i0 == j0 { r + 1 } else { 0 };
                    let mut pairs = Vec::new();
                    let mut below: Option<Pair> = None;
                    for (j, &sim) in row.iter().enumerate().skip(from) {
                        let p = Pair {
                            a,
                            b: (j0 + j) as u32,
                            sim,
                        };
                        if sim >= threshold {
                            pairs.push(p);
                        } else if below.is_none_or(|q| sim > q.sim) {
                            below = Some(p);
                        }
                    }
                    (pairs, below, (nj - from.min(nj)) as u64)
                })
                .collect();
            for (pairs, below, compared) in rows {
                found.pairs.extend(pairs);
                found.compared += compared;
                if let Some(p) = below {
                    if found.closest_below.is_none_or(|q| p.sim > q.sim) {
                        found.closest_below = Some(p);
                    }
                }
            }
        }
    }
    found.pairs.sort_by_key(|p| (p.a, p.b));
    found
}

/// x·y in 16 independent partial sums, so that the compiler vectorises it (a single running
/// f32 sum must be added in order and is not).
fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (xc, yc) = (x.chunks_exact(16), y.chunks_exact(16));
    let tail: f32 = xc
        .remainder()
        .iter()
        .zip(yc.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in xc.zip(yc) {
        for k in 0..16 {
            acc[k] += a[k] * b[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Pairs i < j of `x` [n, d] with cosine ≥ `threshold` among each row's `k` nearest rows of an
/// HNSW index (`usearch`: inner product over f32 rows, its default graph: 16 links per node,
/// 128 candidates while adding, 64 while searching). The rows are added one at a time, in order,
/// so the graph and the pairs are the same on every run; the searches run in parallel. Each
/// candidate's similarity is recomputed from the rows, as the exact search computes it.
/// Approximate: a pair is missed when neither row finds the other among its `k` nearest (more
/// than `k` near-duplicates, or the graph search missing it); its recall against
/// [`exact_pairs`] is measured in the tests.
pub fn hnsw_pairs(x: &[f32], d: usize, threshold: f32, k: usize) -> Result<Found> {
    let n = x.len() / d;
    let options = IndexOptions {
        dimensions: d,
        metric: MetricKind::IP,
        quantization: ScalarKind::F32,
        connectivity: 0,
        expansion_add: 0,
        expansion_search: 0,
        multi: false,
    };
    let index = Index::new(&options).map_err(|e| anyhow!("creating the HNSW index: {e}"))?;
    index
        .reserve_capacity_and_threads(n, rayon::current_num_threads())
        .map_err(|e| anyhow!("reserving the HNSW index for {n} rows: {e}"))?;
    for (i, r) in x.chunks_exact(d).enumerate() {
        index
            .add(i as u64, r)
            .map_err(|e| anyhow!("adding row {i} to the HNSW index: {e}"))?;
    }
    let per_row: Vec<(Vec<Pair>, Option<Pair>, u64)> = x
        .par_chunks_exact(d)
        .enumerate()
        .map(|(i, r)| {
            let m = index
                .search(r, k + 1)
                .map_err(|e| anyhow!("searching the HNSW index for row {i}: {e}"))?;
            let mut pairs = Vec::new();
            let mut below: Option<Pair> = None;
            for &key in &m.keys {
                let j = key as usize;
                if j == i {
                    continue;
                }
                let sim = dot(r, &x[j * d..(j + 1) * d]);
                let (a, b) = (i.min(j) as u32, i.max(j) as u32);
                let pair = Pair { a, b, sim };
                if sim >= threshold {
                    pairs.push(pair);
                } else if below.is_none_or(|q| sim > q.sim) {
                    below = Some(pair);
                }
            }
            Ok((pairs, below, m.keys.len() as u64))
        })
        .collect::<Result<_>>()?;
    let mut found = Found::default();
    for (pairs, below, seen) in per_row {
        found.pairs.extend(pairs);
        found.compared += seen;
        if let Some(p) = below {
            if found.closest_below.is_none_or(|q| p.sim > q.sim) {
                found.closest_below = Some(p);
            }
        }
    }
    // Each pair may be found from both ends.
    found.pairs.sort_by_key(|p| (p.a, p.b));
    found.pairs.dedup_by_key(|p| (p.a, p.b));
    Ok(found)
}

/// The representative of each of `n` records under `pairs`: the lowest index of its connected
/// component (a record in no pair is its own).
pub fn components(n: usize, pairs: &[Pair]) -> Vec<u32> {
    let mut parent: Vec<u32> = (0..n as u32).collect();
    fn find(parent: &mut [u32], mut i: u32) -> u32 {
        while parent[i as usize] != i {
            let up = parent[parent[i as usize] as usize];
            parent[i as usize] = up;
            i = up;
        }
        i
    }
    for p in pairs {
        let (ra, rb) = (find(&mut parent, p.a), find(&mut parent, p.b));
        // The smaller root wins, so every root is its component's minimum.
        match ra.cmp(&rb) {
            std::cmp::Ordering::Less => parent[rb as usize] = ra,
            std::cmp::Ordering::Greater => parent[ra as usize] = rb,
            std::cmp::Ordering::Equal => {}
        }
    }
    (0..n as u32).map(|i| find(&mut parent, i)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// `n` random unit vectors of `d` values.
    fn unit_rows(n: usize, d: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
        let mut x: Vec<f32> = (0..n * d).map(|_| rng.random::<f32>() - 0.5).collect();
        for r in x.chunks_exact_mut(d) {
            let norm = r.iter().map(|v| v * v).sum::<f32>().sqrt();
            r.iter_mut().for_each(|v| *v /= norm);
        }
        x
    }

    /// A copy of row `src` of `x` moved by `eps`·noise and renormalised, appended to `x`.
    fn push_near(x: &mut Vec<f32>, d: usize, src: usize, eps: f32, rng: &mut ChaCha8Rng) {
        let mut r: Vec<f32> = x[src * d..(src + 1) * d]
            .iter()
            .map(|v| v + eps * (rng.random::<f32>() - 0.5))
            .collect();
        let norm = r.iter().map(|v| v * v).sum::<f32>().sqrt();
        r.iter_mut().for_each(|v| *v /= norm);
        x.extend(r);
    }

    /// Every pair, one by one: the reference the blocked search must equal.
    fn brute(x: &[f32], d: usize, t: f32) -> Vec<(u32, u32)> {
        let n = x.len() / d;
        let mut out = Vec::new();
        for i in 0..n {
            for j in i + 1..n {
                let s: f32 = (0..d).map(|k| x[i * d + k] * x[j * d + k]).sum();
                if s >= t {
                    out.push((i as u32, j as u32));
                }
            }
        }
        out
    }

    #[test]
    fn blocked_search_equals_brute_force_across_block_edges() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let d = 16;
        // More rows than one block, near-copies on both sides of the block edge.
        let mut x = unit_rows(BLOCK + 100, d, &mut rng);
        for src in [0, 5, BLOCK - 1, BLOCK + 3] {
            push_near(&mut x, d, src, 0.05, &mut rng);
        }
        let t = 0.97;
        let found = exact_pairs(&x, d, t);
        let got: Vec<(u32, u32)> = found.pairs.iter().map(|p| (p.a, p.b)).collect();
        let want = brute(&x, d, t);
        assert!(want.len() >= 4, "the planted pairs: {want:?}");
        assert_eq!(got, want);
        let n = (x.len() / d) as u64;
        assert_eq!(found.compared, n * (n - 1) / 2);
        assert!(found.closest_below.unwrap().sim < t);
    }

    #[test]
    fn best_match_finds_each_rows_nearest_of_the_other_set() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let d = 8;
        let y = unit_rows(50, d, &mut rng);
        let mut x = y.clone();
        x.truncate(10 * d);
        x.extend(unit_rows(5, d, &mut rng));
        let best = best_matches(&x, &y, d);
        for (i, b) in best.iter().enumerate().take(10) {
            let (j, s) = b.unwrap();
            assert_eq!(j as usize, i);
            assert!((s - 1.0).abs() < 1e-5, "{s}");
        }
        assert!(best_matches(&x, &[], d).iter().all(Option::is_none));
    }

    #[test]
    fn components_keep_the_lowest_index_of_each_chain() {
        let p = |a, b| Pair { a, b, sim: 1.0 };
        // 5–7, 2–5, 7–9 form one component {2, 5, 7, 9}; 1–3 another.
        let roots = components(10, &[p(5, 7), p(2, 5), p(7, 9), p(1, 3)]);
        assert_eq!(roots, vec![0, 1, 2, 1, 4, 2, 6, 2, 8, 2]);
    }

    /// Recall of the HNSW search against the exact one on 4,000 random unit vectors of D = 256
    /// and 330 planted near-duplicates (cosine about 0.97), 30 of them in chains of three.
    #[test]
    fn hnsw_recall_against_exact_search() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let d = 256;
        let n = 4000;
        let mut x = unit_rows(n, d, &mut rng);
        for i in 0..330 {
            let src = if i % 10 == 9 { n + i - 1 } else { i * 11 };
            push_near(&mut x, d, src, 0.02, &mut rng);
        }
        let t = 0.94;
        let exact = exact_pairs(&x, d, t);
        let approx = hnsw_pairs(&x, d, t, 10).unwrap();
        let want: std::collections::HashSet<(u32, u32)> =
            exact.pairs.iter().map(|p| (p.a, p.b)).collect();
        let got: std::collections::HashSet<(u32, u32)> =
            approx.pairs.iter().map(|p| (p.a, p.b)).collect();
        // The planted pairs, and the chains' ends (a copy of a copy, still above t).
        assert!(want.len() >= 330, "{}", want.len());
        // Nothing below the threshold, nothing that exact search did not find.
        assert!(got.is_subset(&want));
        let recall = got.len() as f64 / want.len() as f64;
        eprintln!(
            "HNSW (k 10) recall of the {} pairs ≥ {t}: {recall:.4}; {} similarities against {}",
            want.len(),
            approx.compared,
            exact.compared
        );
        assert!(recall >= 0.99, "recall {recall:.4}");
        // The closest pair below the threshold is a random pair, far below it.
        assert!(approx.closest_below.unwrap().sim < t);
        // And the components agree where the pairs do.
        let (ne, na) = (components(x.len() / d, &exact.pairs), {
            components(x.len() / d, &approx.pairs)
        });
        let diff = ne.iter().zip(&na).filter(|(a, b)| a != b).count();
        assert!(diff <= want.len() - got.len(), "{diff} records differ");
        // The same pairs on a second run: the index is built in order.
        let again = hnsw_pairs(&x, d, t, 10).unwrap();
        assert_eq!(again.pairs, approx.pairs);
    }

    /// Benchmark (ignored; prints): the exact search against the HNSW index (build, then the
    /// queries) on N random unit vectors of D = 512 with N/16 planted near-duplicates, N = 5,000
    /// and 10,000: the numbers behind `--exact-max` (docs/dedup.md).
    #[test]
    #[ignore = "benchmark: prints search and index times; run with --ignored --nocapture"]
    fn bench_exact_against_hnsw_d512() {
        eprintln!("usearch {}", usearch::version());
        let d = 512;
        for n in [5000, 10000] {
            let mut rng = ChaCha8Rng::seed_from_u64(4);
            let mut x = unit_rows(n, d, &mut rng);
            for i in 0..n / 16 {
                push_near(&mut x, d, i * 13, 0.02, &mut rng);
            }
            let rows = x.len() / d;
            let t = 0.94;
            let t0 = std::time::Instant::now();
            let exact = exact_pairs(&x, d, t);
            let te = t0.elapsed().as_secs_f64();
            let want: std::collections::HashSet<(u32, u32)> =
                exact.pairs.iter().map(|p| (p.a, p.b)).collect();
            let t0 = std::time::Instant::now();
            let f = hnsw_pairs(&x, d, t, 16).unwrap();
            let th = t0.elapsed().as_secs_f64();
            let hits = f
                .pairs
                .iter()
                .filter(|p| want.contains(&(p.a, p.b)))
                .count();
            eprintln!(
                "N {rows}: exact {te:.2} s ({:.3e} similarities/s); HNSW (k 16) build + queries \
                 {th:.2} s ({:.3} ms per vector), recall {:.4} of {} pairs",
                exact.compared as f64 / te,
                th / rows as f64 * 1e3,
                hits as f64 / want.len() as f64,
                want.len()
            );
        }
    }
}
