//! `trainer reconstruct` through the binary: the grid holds the originals exactly and the
//! reconstructions that `Dvae::encode` + `decode_codes` give, the printed MSE is theirs, and bad
//! input (images a dVAE cannot take, weights that do not match) fails before anything is written.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use formats::image_shard::{ImageShard, ImageShardWriter};
use trainer::checkpoint::{self, entries, write_tensors, TensorFile, EMA_FILE, MODEL_FILE};
use trainer::data::image_loader::hwc_to_chw;
use trainer::model::dvae::{Dvae, DvaeDims};
use trainer::reconstruct::pair_origin;

mod support;
use support::trainer;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

const RES: usize = 64;

fn dims() -> DvaeDims {
    DvaeDims {
        resolution: RES,
        n_hid: 8,
        n_blk_per_group: 1,
        vocab_size: 32,
        n_init: 8,
    }
}

/// `n` images of `res`×`res`: colour gradients with a bright square at a different place in each.
fn write_shard(path: &Path, n: usize, res: usize) {
    let mut w = ImageShardWriter::create(path, res as u32, 4, 3).unwrap();
    for i in 0..n {
        let mut px = vec![0u8; res * res * 3];
        for y in 0..res {
            for x in 0..res {
                let p = &mut px[(y * res + x) * 3..][..3];
                p[0] = (x * 255 / res) as u8;
                p[1] = (y * 255 / res) as u8;
                p[2] = (i * 40 % 256) as u8;
                let (cx, cy) = (i * 9 % res, i * 13 % res);
                if x.abs_diff(cx) < res / 6 && y.abs_diff(cy) < res / 6 {
                    p.copy_from_slice(&[250, 250, 250]);
                }
            }
        }
        w.push(&px, &format!("image {i}"), None).unwrap();
    }
    w.finish().unwrap();
}

fn write_weights(path: &Path, seed: u64) -> (Dvae, Vec<f32>) {
    let m = Dvae::new(dims()).unwrap();
    let w = m.init_params(seed);
    write_tensors(path, &entries(m.table(), "", &w)).unwrap();
    (m, w)
}

/// `n` images of [`write_shard`] in `dir`/images.tis and the weights of seed 3 in
/// `dir`/dvae.safetensors: (shard, weights, model, parameters).
fn shard_and_weights(dir: &Path, n: usize) -> (PathBuf, PathBuf, Dvae, Vec<f32>) {
    let shard = dir.join("images.tis");
    write_shard(&shard, n, RES);
    let weights = dir.join("dvae.safetensors");
    let (m, w) = write_weights(&weights, 3);
    (shard, weights, m, w)
}

/// The first `n` images of `shard`, [n, 3, H, W] in [0, 1].
fn shard_images(shard: &Path, n: usize) -> Vec<f32> {
    let s = ImageShard::open(shard).unwrap();
    let px = 3 * RES * RES;
    let mut images = vec![0.0f32; n * px];
    for (i, dst) in images.chunks_exact_mut(px).enumerate() {
        hwc_to_chw(&s.record(i as u64).unwrap().pixels, dst);
    }
    images
}

/// The reconstruction of `images` through their argmax codes (`Dvae::encode` + `decode_codes`)
/// and its mean squared error: what `trainer reconstruct` draws and prints.
fn reconstruct(m: &Dvae, w: &[f32], images: &[f32]) -> (Vec<f32>, f64) {
    let recon = m.decode_codes(w, &m.encode(w, images).unwrap()).unwrap();
    let mse = (images.iter().zip(&recon))
        .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
        .sum::<f64>()
        / images.len() as f64;
    (recon, mse)
}

/// The MSE that `trainer reconstruct` printed.
fn printed_mse(o: &Output) -> f64 {
    let s = String::from_utf8_lossy(&o.stdout);
    let at = s.find("MSE ").unwrap_or_else(|| panic!("no MSE in {s}"));
    s[at + 4..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn grid_holds_originals_and_reconstructions_and_mse_is_theirs() {
    let tmp = tempfile::tempdir().unwrap();
    let (shard, weights, m, w) = shard_and_weights(tmp.path(), 6);
    let out = tmp.path().join("grid.png");
    let (n, batch) = (5, 2);
    let o = trainer(&[
        "reconstruct",
        "--weights",
        weights.to_str().unwrap(),
        "--images",
        shard.to_str().unwrap(),
        "--count",
        &n.to_string(),
        "--batch",
        &batch.to_string(),
        "--out",
        out.to_str().unwrap(),
        "--pictures",
        tmp.path().join("pictures").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("reconstructed 5 images of 64×64"),
        "{}",
        text(&o)
    );

    // The same images through the library.
    let (s, px) = (ImageShard::open(&shard).unwrap(), 3 * RES * RES);
    let (recon, mse) = reconstruct(&m, &w, &shard_images(&shard, n));
    let got = printed_mse(&o);
    assert!((got - mse).abs() <= 1e-6, "printed {got}, expected {mse}");
    assert!(mse > 0.0);

    // The grid: ⌈√5⌉ = 3 pairs per row, 2 rows, 8 px gaps, 2 px inside a pair.
    let img = image::open(&out).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (3 * (2 * 64 + 2) + 4 * 8, 2 * 64 + 3 * 8));
    let to_u8 = |v: f32| (v * 255.0).round().clamp(0.0, 255.0) as u8;
    for i in 0..n {
        let [(ox, oy), (rx, ry)] = pair_origin(i, n, RES);
        let stored = s.record(i as u64).unwrap().pixels;
        for y in 0..RES {
            for x in 0..RES {
                let a = img.get_pixel(ox + x as u32, oy + y as u32).0;
                assert_eq!(
                    a[..],
                    stored[(y * RES + x) * 3..][..3],
                    "original {i} at {x},{y}"
                );
                let b = img.get_pixel(rx + x as u32, ry + y as u32).0;
                let c = |ch: usize| to_u8(recon[i * px + ch * RES * RES + y * RES + x]);
                assert_eq!(b, [c(0), c(1), c(2)], "reconstruction {i} at {x},{y}");
            }
        }
    }
    // --pictures: each reconstruction alone, the grid's pixels, beside its record's caption.
    let mut names: Vec<String> = fs::read_dir(tmp.path().join("pictures"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let want: Vec<String> = (0..n)
        .flat_map(|i| [format!("{i:06}.png"), format!("{i:06}.txt")])
        .collect();
    assert_eq!(names, want);
    for i in 0..n {
        let pic = tmp.path().join(format!("pictures/{i:06}.png"));
        let pic = image::open(pic).unwrap().to_rgb8();
        assert_eq!(pic.dimensions(), (RES as u32, RES as u32));
        let [_, (rx, ry)] = pair_origin(i, n, RES);
        for (x, y, p) in pic.enumerate_pixels() {
            assert_eq!(*p, *img.get_pixel(rx + x, ry + y), "picture {i} at {x},{y}");
        }
        let caption = fs::read_to_string(tmp.path().join(format!("pictures/{i:06}.txt"))).unwrap();
        assert_eq!(caption, format!("image {i}"));
    }

    // Between the two halves of a pair, the background.
    let [(ox, oy), _] = pair_origin(0, n, RES);
    assert_eq!(img.get_pixel(ox + RES as u32, oy).0, [255, 255, 255]);
}

#[test]
fn checkpoint_directories_and_ema_load_and_count_is_capped_by_the_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let shard = tmp.path().join("images.tis");
    write_shard(&shard, 3, RES);
    let m = Dvae::new(dims()).unwrap();
    let (w, ema) = (m.init_params(1), m.init_params(2));
    let run = tmp.path().join("run");
    let files = [
        TensorFile {
            file_name: MODEL_FILE,
            tensors: entries(m.table(), "", &w),
        },
        TensorFile {
            file_name: EMA_FILE,
            tensors: entries(m.table(), "", &ema),
        },
    ];
    let step = checkpoint::save(&run, 40, &files, &serde_json::json!({}), "", 2).unwrap();
    let out = tmp.path().join("r.png");
    let go = |weights: &Path, extra: &[&str]| {
        let mut args = vec![
            "reconstruct",
            "--weights",
            weights.to_str().unwrap(),
            "--images",
            shard.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        trainer(&args)
    };
    let o = go(&run, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let s = text(&o);
    assert!(
        s.contains("reconstructed 3 images") && s.contains("step_00000040"),
        "{s}"
    );
    let model_mse = printed_mse(&o);
    let o = go(&step, &["--ema"]);
    assert!(
        o.status.success() && text(&o).contains(EMA_FILE),
        "{}",
        text(&o)
    );
    assert_ne!(
        printed_mse(&o),
        model_mse,
        "the EMA weights are other weights"
    );
}

#[test]
fn images_and_weights_that_do_not_fit_fail_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = tmp.path().join("dvae.safetensors");
    write_weights(&weights, 1);
    let out = tmp.path().join("grid.png");
    let run = |images: &PathBuf, weights: &PathBuf| {
        trainer(&[
            "reconstruct",
            "--weights",
            weights.to_str().unwrap(),
            "--images",
            images.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
    };
    // 60 px is no multiple of 8.
    let odd = tmp.path().join("odd.tis");
    write_shard(&odd, 2, 60);
    let o = run(&odd, &weights);
    let e = text(&o);
    assert!(
        !o.status.success()
            && e.contains("odd.tis")
            && e.contains("60×60")
            && e.contains("divisible by 8"),
        "{e}"
    );
    // Not an image shard.
    let o = run(&weights, &weights);
    assert!(
        !o.status.success() && text(&o).contains("not an image shard"),
        "{}",
        text(&o)
    );
    // Weights with a tensor missing.
    let good = tmp.path().join("good.tis");
    write_shard(&good, 2, RES);
    let m = Dvae::new(dims()).unwrap();
    let w = m.init_params(1);
    let mut t = entries(m.table(), "", &w);
    t.retain(|e| e.name != "decoder.blocks.group_4.block_1.res_path.conv_2.w");
    let broken = tmp.path().join("broken.safetensors");
    write_tensors(&broken, &t).unwrap();
    let o = run(&good, &broken);
    let e = text(&o);
    assert!(
        !o.status.success()
            && e.contains("broken.safetensors")
            && e.contains("decoder.blocks.group_4.block_1.res_path.conv_2.w"),
        "{e}"
    );
    // An output folder that does not exist.
    let o = trainer(&[
        "reconstruct",
        "--weights",
        weights.to_str().unwrap(),
        "--images",
        good.to_str().unwrap(),
        "--out",
        tmp.path().join("no/such/dir/g.png").to_str().unwrap(),
    ]);
    assert!(
        !o.status.success() && text(&o).contains("does not exist"),
        "{}",
        text(&o)
    );
    assert!(!out.exists(), "nothing is written on bad input");
}

/// `--images` takes glob patterns and several paths (the dvae-cpu.yaml comment's form): the first
/// `--count` images of the matches in sorted path order; the grid is the one a single shard of
/// the same images gives.
#[test]
fn images_from_a_glob_span_shards_in_path_order() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = tmp.path().join("dvae.safetensors");
    write_weights(&weights, 5);
    let dir = tmp.path().join("shards");
    fs::create_dir(&dir).unwrap();
    // images-1.tis holds 2 images, images-0.tis 3: sorted, images 0..3 come first.
    write_shard(&dir.join("images-0.tis"), 3, RES);
    write_shard(&dir.join("images-1.tis"), 2, RES);
    let pattern = format!("{}/images-*.tis", dir.display());
    let run = |images: &[&str], out: &Path| {
        let mut args = vec!["reconstruct", "--weights", weights.to_str().unwrap()];
        args.push("--images");
        args.extend_from_slice(images);
        args.extend_from_slice(&["--count", "5", "--out", out.to_str().unwrap()]);
        trainer(&args)
    };
    let a = tmp.path().join("a.png");
    let o = run(&[&pattern], &a);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("reconstructed 5 images"), "{}", text(&o));
    // The same five images as two explicit paths, listed out of order.
    let b = tmp.path().join("b.png");
    let (p0, p1) = (dir.join("images-0.tis"), dir.join("images-1.tis"));
    let o = run(&[p1.to_str().unwrap(), p0.to_str().unwrap()], &b);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
    // Image 3 is the first image of images-1.tis, not the 4th of a shard of 5.
    let grid = image::open(&a).unwrap().to_rgb8();
    let [(x0, y0), _] = pair_origin(3, 5, RES);
    let first_of_second = ImageShard::open(&p1).unwrap().record(0).unwrap().pixels;
    assert_eq!(grid.get_pixel(x0, y0).0, first_of_second[..3]);
    // A pattern that matches nothing names itself.
    let o = run(&[&format!("{}/none-*.tis", dir.display())], &b);
    assert!(
        !o.status.success() && text(&o).contains("none-*.tis"),
        "{}",
        text(&o)
    );
}

/// A decoder run (`configs/dvae-cpu-decoder.yaml`'s recipe, small): `train.init` starts it from
/// a dVAE's weights, and with `relaxation.decoder_input: argmax` only the decoder moves: the
/// encoder, and so every code, is bit for bit the one it started from. A `train.init` that does
/// not fit fails naming it.
#[test]
fn a_decoder_run_from_trained_weights_moves_the_decoder_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let (shard, weights, m, w) = shard_and_weights(tmp.path(), 8);
    let d = dims();
    // Enough updates for the decoder to learn the codes of 8 images.
    const STEPS: u64 = 60;
    let config = |name: &str, init: &Path, extra: &str| {
        let path = tmp.path().join(format!("{name}.yaml"));
        let text = format!(
            "run:\n  name: {name}\n  out_dir: {out}\n  device: cpu\n\
             model:\n  kind: dvae\n  resolution: {RES}\n  n_hid: {}\n  n_blk_per_group: {}\n  \
             vocab_size: {}\n  n_init: {}\n\
             relaxation:\n  beta_start: 0\n  beta_end: 0\n  likelihood: logit-gaussian\n  \
             kl: batch\n  decoder_input: argmax\n\
             data:\n  source: images\n  paths: [{shard}]\n\
             optim:\n  lr: 1.0e-2\n  weight_decay: 0\n  ema: 0.9\n\
             train:\n  steps: {STEPS}\n  batch_size: 2\n  init: {init}\n{extra}\
             checkpoint:\n  every: {STEPS}\n",
            d.n_hid,
            d.n_blk_per_group,
            d.vocab_size,
            d.n_init,
            out = tmp.path().join(name).display(),
            shard = shard.display(),
            init = init.display(),
        );
        fs::write(&path, text).unwrap();
        path
    };
    let run = |cfg: &Path| trainer(&["train", "--config", cfg.to_str().unwrap()]);

    let o = run(&config("decoder", &weights, ""));
    assert!(o.status.success(), "{}", text(&o));
    let mut after = vec![0.0f32; w.len()];
    let file = checkpoint::step_dir(&tmp.path().join("decoder"), STEPS).join(MODEL_FILE);
    checkpoint::load_weights(&file, m.table(), &mut after).unwrap();
    let (mut encoder, mut decoder_moved) = (0, 0);
    for spec in m.table().specs() {
        let r = spec.offset..spec.offset + spec.numel();
        if spec.name.starts_with("encoder.") {
            let same = w[r.clone()]
                .iter()
                .zip(&after[r])
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{} moved", spec.name);
            encoder += 1;
        } else if w[r.clone()] != after[r] {
            decoder_moved += 1;
        }
    }
    assert!(encoder > 0);
    assert!(decoder_moved > 0, "no decoder tensor moved");
    // What a user runs it for: the same codes reconstruct the training images better.
    let images = shard_images(&shard, 8);
    let (before, after) = (
        reconstruct(&m, &w, &images).1,
        reconstruct(&m, &after, &images).1,
    );
    assert!(after < 0.9 * before, "MSE {before} → {after}");

    // What does not fit: weights of another codebook size, the EMA of a plain file, nothing.
    let small = tmp.path().join("other.safetensors");
    let other = Dvae::new(DvaeDims {
        vocab_size: 16,
        ..dims()
    })
    .unwrap();
    write_tensors(&small, &entries(other.table(), "", &other.init_params(1))).unwrap();
    let o = run(&config("wrong", &small, ""));
    assert!(!o.status.success());
    let e = text(&o);
    assert!(
        e.contains("train.init") && e.contains("other.safetensors"),
        "{e}"
    );
    let o = run(&config("ema-of-file", &weights, "  init_ema: true\n"));
    assert!(!o.status.success());
    let e = text(&o);
    assert!(
        e.contains("train.init_ema") && e.contains("is a file"),
        "{e}"
    );
    let o = run(&config("missing", &tmp.path().join("nowhere"), ""));
    assert!(!o.status.success());
    let e = text(&o);
    assert!(e.contains("train.init") && e.contains("nowhere"), "{e}");
}
