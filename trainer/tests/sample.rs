//! `trainer sample` end to end: a tiny transformer trained for two updates, a dVAE with fresh
//! weights and a tokenizer trained on the spot; pictures, grids and index.json come out,
//! identical for a seed; bad paths are errors that name them. CLIP re-ranking (`--clip`,
//! `--keep`) with a tiny Hugging Face CLIP the test writes. And the sample grids a training run
//! draws (`samples:`).

mod support;

use formats::bpe::BpeTokenizer;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use trainer::checkpoint::{entries, write_tensors};
use trainer::config::RunConfig;
use trainer::model::dvae::{Dvae, DvaeDims};

const WORDS: [&str; 8] = [
    "red", "blue", "circle", "square", "above", "below", "small", "large",
];

/// The transformer run's config: `steps` updates into `out`.
fn run_yaml(out: &Path, steps: u64) -> String {
    format!(
        "run:\n  name: t\n  out_dir: {}\n  device: cpu\nmodel:\n  text_len: 6\n  text_vocab: 300\n  \
         grid: 2\n  image_vocab: 16\n  d_model: 16\n  heads: 2\n  layers: 2\n  conv_kernel: 3\n\
         data:\n  source: synthetic\n  min_caption_tokens: 2\ntrain:\n  steps: {steps}\n  batch_size: 2\n",
        out.display()
    )
}

/// A transformer run (text_vocab 300, G 2, Vi 16), a dVAE for 16×16 pictures with 16 codes and
/// a tokenizer of at most 300 ids.
fn fixtures(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let caption = |i: u64| {
        (0..3)
            .map(|k| WORDS[((i * 5 + k * 3) % 8) as usize])
            .collect::<Vec<_>>()
            .join(" ")
    };
    let tok = BpeTokenizer::train((0..40).map(caption), 290, 1).unwrap();
    let tok_path = dir.join("tokenizer.json");
    tok.save(&tok_path).unwrap();

    let run = dir.join("run");
    trainer::train::run(
        &RunConfig::from_yaml_str(&run_yaml(&run, 2), "t").unwrap(),
        true,
    )
    .unwrap();

    let dvae = Dvae::new(DvaeDims {
        resolution: 16,
        n_hid: 4,
        n_blk_per_group: 1,
        vocab_size: 16,
        n_init: 4,
    })
    .unwrap();
    let w = dvae.init_params(3);
    let dvae_path = dir.join("dvae.safetensors");
    write_tensors(&dvae_path, &entries(dvae.table(), "", &w)).unwrap();
    (run, dvae_path, tok_path)
}

fn sample(run: &Path, dvae: &Path, tok: &Path, out: &Path, seed: &str) -> std::process::Output {
    sample_batch(run, dvae, tok, out, seed, "2")
}

fn sample_batch(
    run: &Path,
    dvae: &Path,
    tok: &Path,
    out: &Path,
    seed: &str,
    batch: &str,
) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["sample", "--transformer"])
        .arg(run)
        .arg("--dvae")
        .arg(dvae)
        .arg("--tokenizer")
        .arg(tok)
        .args([
            "--prompt",
            "red circle above",
            "--prompt",
            "blue square",
            "-n",
            "3",
        ])
        .args([
            "--batch",
            batch,
            "--seed",
            seed,
            "--top-k",
            "8",
            "--no-captions",
        ])
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

/// `trainer sample` with the test's two prompts, `--top-k 8` and `args`, ready to run.
fn sample_cmd(run: &Path, dvae: &Path, tok: &Path, out: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trainer"));
    cmd.args(["sample", "--transformer"])
        .arg(run)
        .arg("--dvae")
        .arg(dvae)
        .arg("--tokenizer")
        .arg(tok)
        .args(["--prompt", "red circle above", "--prompt", "blue square"])
        .args(["--top-k", "8", "--out"])
        .arg(out)
        .args(args);
    cmd
}

/// [`sample_cmd`], run.
fn sample_with(
    run: &Path,
    dvae: &Path,
    tok: &Path,
    out: &Path,
    args: &[&str],
) -> std::process::Output {
    sample_cmd(run, dvae, tok, out, args).output().unwrap()
}

/// A tiny Hugging Face CLIP directory (8×8 pictures, word-level tokenizer) in `dir/clip`.
fn clip_dir(dir: &Path) -> PathBuf {
    let clip = dir.join("clip");
    fs::create_dir_all(&clip).unwrap();
    support::clip::write_dir(
        &clip,
        &support::clip::config(support::clip::END, "quick_gelu", "gelu"),
        3,
    );
    clip
}

/// The cosine of `png`'s CLIP image embedding with `caption`'s text embedding, computed here
/// through the library's CLIP API one picture at a time.
fn clip_score(clip: &trainer::model::clip::hf::HfClip, caption: &str, png: &Path) -> f32 {
    use trainer::model::clip::Activations;
    let s = clip.tokenizer.context();
    let mut acts = Activations::new(&clip.model, 1, s).unwrap();
    let ids = clip.tokenizer.encode(caption).unwrap();
    clip.model
        .text_forward(&clip.params, &mut acts, &ids)
        .unwrap();
    let (px, _, _) = clip
        .preprocessor
        .apply(&image::open(png).unwrap().to_rgb8())
        .unwrap();
    clip.model
        .image_forward(&clip.params, &mut acts, &px)
        .unwrap();
    let dot: f32 = acts
        .text_embeds
        .iter()
        .zip(&acts.image_embeds)
        .map(|(a, b)| a * b)
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(&acts.text_embeds) * norm(&acts.image_embeds))
}

#[test]
fn sample_writes_grids_pictures_and_an_index_deterministically() {
    let tmp = tempfile::tempdir().unwrap();
    let (run, dvae, tok) = fixtures(tmp.path());
    let out = tmp.path().join("out");
    let o = sample(&run, &dvae, &tok, &out, "1");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout)
        .contains("sampled 3 pictures of 16×16 for each of 2 prompts"));
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["prompts"][1], "blue square");
    assert!(index["transformer_weights"]
        .as_str()
        .unwrap()
        .ends_with("ema.safetensors"));
    for p in 0..2 {
        // 3 pictures: 2 per row, 2 rows, with 4-pixel gaps.
        let grid = image::open(out.join(format!("prompt_{p:03}.png"))).unwrap();
        assert_eq!((grid.width(), grid.height()), (2 * 16 + 12, 2 * 16 + 12));
        for j in 0..3 {
            let one = image::open(out.join(format!("prompt_{p:03}_{j:02}.png"))).unwrap();
            assert_eq!((one.width(), one.height()), (16, 16));
        }
    }
    // The same seed: the same bytes. Another seed: other pictures.
    let again = tmp.path().join("again");
    assert!(sample(&run, &dvae, &tok, &again, "1").status.success());
    let other = tmp.path().join("other");
    assert!(sample(&run, &dvae, &tok, &other, "2").status.success());
    let grids = |dir: &Path| {
        (0..2)
            .map(|p| fs::read(dir.join(format!("prompt_{p:03}.png"))).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(grids(&out), grids(&again));
    assert_ne!(grids(&out), grids(&other));
}

#[test]
fn sample_names_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let (run, dvae, tok) = fixtures(tmp.path());
    let out = tmp.path().join("out");
    let missing = tmp.path().join("no-such-run");
    let o = sample(&missing, &dvae, &tok, &out, "1");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no-such-run"));
    // The weights file instead of its run: the sizes would be unknown.
    let o = sample(&dvae, &dvae, &tok, &out, "1");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("checkpoint or run directory"));
    // The run's checkpoint as the dVAE: a transformer's tensors.
    let o = sample(&run, &run, &tok, &out, "1");
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--dvae"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!out.exists(), "nothing written on error");
}

/// `--clip DIR --keep 3` of `-n 5`: the kept pictures are exactly the 3 of the 5 drawn (the
/// same seed without `--clip`) with the highest score the test computes itself, best first, in
/// the grid and the numbered files; scores.json holds every score and the kept ones.
#[test]
fn clip_keeps_the_best_pictures_in_score_order() {
    let tmp = tempfile::tempdir().unwrap();
    let (run, dvae, tok) = fixtures(tmp.path());
    let clip = clip_dir(tmp.path());
    let all = tmp.path().join("all");
    let o = sample_with(&run, &dvae, &tok, &all, &["-n", "5", "--seed", "3"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ranked = tmp.path().join("ranked");
    let mut args = vec![
        "-n",
        "5",
        "--seed",
        "3",
        "--no-captions",
        "--keep",
        "3",
        "--clip",
    ];
    args.push(clip.to_str().unwrap());
    let o = sample_with(&run, &dvae, &tok, &ranked, &args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("kept the best 3 of each"), "{stdout}");

    let model = trainer::model::clip::hf::load_dir(&clip).unwrap();
    let written: serde_json::Value =
        serde_json::from_slice(&fs::read(ranked.join("scores.json")).unwrap()).unwrap();
    let mut reordered = false;
    for (p, prompt) in ["red circle above", "blue square"].iter().enumerate() {
        let drawn = |j: usize| all.join(format!("prompt_{p:03}_{j:02}.png"));
        let scores: Vec<f32> = (0..5)
            .map(|j| clip_score(&model, prompt, &drawn(j)))
            .collect();
        let mut best: Vec<usize> = (0..5).collect();
        best.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        let gap = scores[best[2]] - scores[best[3]];
        assert!(
            gap > 1e-4,
            "prompt {p}: 3rd and 4th score too close to rank: {scores:?}"
        );
        reordered |= best[..3] != [0, 1, 2];
        let entry = &written[p];
        assert_eq!(entry["prompt"], *prompt);
        for j in 0..5 {
            let s = entry["scores"][j].as_f64().unwrap() as f32;
            assert!(
                (s - scores[j]).abs() < 1e-5,
                "prompt {p} picture {j}: {s} vs {}",
                scores[j]
            );
        }
        let grid = image::open(ranked.join(format!("prompt_{p:03}.png")))
            .unwrap()
            .to_rgb8();
        // 3 pictures: 2 per row, 2 rows, with 4-pixel gaps.
        assert_eq!(grid.dimensions(), (2 * 16 + 12, 2 * 16 + 12));
        for (rank, &j) in best[..3].iter().enumerate() {
            let kept = ranked.join(format!("prompt_{p:03}_{rank:02}.png"));
            assert_eq!(
                fs::read(&kept).unwrap(),
                fs::read(drawn(j)).unwrap(),
                "prompt {p}: rank {rank} should be picture {j} (scores {scores:?})"
            );
            assert_eq!(entry["kept"][rank]["drawn"], j);
            let one = image::open(&kept).unwrap().to_rgb8();
            let (x0, y0) = (4 + (rank as u32 % 2) * 20, 4 + (rank as u32 / 2) * 20);
            for (x, y, px) in one.enumerate_pixels() {
                assert_eq!(grid.get_pixel(x0 + x, y0 + y), px, "prompt {p} rank {rank}");
            }
        }
        assert!(!ranked.join(format!("prompt_{p:03}_03.png")).exists());
    }
    assert!(
        reordered,
        "the drawn order already was the ranking: the test shows nothing"
    );
}

/// A Tessera CLIP run (`model.kind: clip`, trained here for one update on 16 px pictures) as
/// `--clip`: the scores are the cosines the test computes from the run's weights, its captions'
/// encoding and CLIP's normalisation of each written PNG, and the kept pictures are the best.
#[test]
fn a_tessera_clip_run_ranks_the_pictures() {
    use trainer::model::clip::{Activations, Clip};
    let tmp = tempfile::tempdir().unwrap();
    let (run, dvae, tok) = fixtures(tmp.path());
    let mut shard =
        formats::image_shard::ImageShardWriter::create(tmp.path().join("images.tis"), 16, 4, 3)
            .unwrap();
    for (i, word) in WORDS.iter().take(4).enumerate() {
        let px: Vec<u8> = (0..16 * 16 * 3)
            .map(|j| ((i * 37 + j * 11) % 251) as u8)
            .collect();
        shard.push(&px, word, None).unwrap();
    }
    shard.finish().unwrap();
    let clip_run = tmp.path().join("cliprun");
    let yaml = format!(
        "run: {{ name: c, out_dir: {out}, seed: 7 }}\n\
         model: {{ kind: clip, projection_dim: 8,\n  \
           text_config: {{ vocab_size: 302, hidden_size: 8, intermediate_size: 16, \
             num_attention_heads: 2, num_hidden_layers: 1, max_position_embeddings: 6, \
             eos_token_id: 301, hidden_act: quick_gelu }},\n  \
           vision_config: {{ hidden_size: 8, intermediate_size: 16, num_attention_heads: 2, \
             num_hidden_layers: 1, image_size: 16, patch_size: 8, hidden_act: quick_gelu }} }}\n\
         data: {{ source: images, paths: [\"{dir}/*.tis\"], tokenizer: {tok} }}\n\
         train: {{ steps: 1, batch_size: 2 }}\n",
        out = clip_run.display(),
        dir = tmp.path().display(),
        tok = tok.display(),
    );
    let cfg = RunConfig::from_yaml_str(&yaml, "clip.yaml").unwrap();
    trainer::train::run(&cfg, true).unwrap();

    let out = tmp.path().join("out");
    let args = [
        "-n",
        "3",
        "--keep",
        "2",
        "--clip",
        clip_run.to_str().unwrap(),
    ];
    let o = sample_with(&run, &dvae, &tok, &out, &args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("index.json")).unwrap()).unwrap();
    let weights = PathBuf::from(index["clip_weights"].as_str().unwrap());
    assert!(weights.starts_with(&clip_run), "{}", weights.display());
    let written: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("scores.json")).unwrap()).unwrap();

    let dims = *cfg.model.clip().unwrap();
    let model = Clip::new(dims).unwrap();
    let mut params = vec![0.0f32; model.table().numel()];
    trainer::checkpoint::load_weights(&weights, model.table(), &mut params).unwrap();
    let captions = trainer::train::objectives::ClipCaptions::open(&cfg).unwrap();
    let (mean, std) = (
        [0.481_454_66f32, 0.457_827_5, 0.408_210_73],
        [0.268_629_54f32, 0.261_302_6, 0.275_777_1],
    );
    for (p, prompt) in ["red circle above", "blue square"].iter().enumerate() {
        let mut ids = Vec::new();
        captions.encode(prompt, &mut ids).unwrap();
        let mut acts = Activations::new(&model, 1, 6).unwrap();
        model.text_forward(&params, &mut acts, &ids).unwrap();
        let kept = &written[p]["kept"];
        let mut last = f32::INFINITY;
        for rank in 0..2 {
            let png = out.join(format!("prompt_{p:03}_{rank:02}.png"));
            let img = image::open(&png).unwrap().to_rgb8();
            let mut px = vec![0.0f32; 3 * 256];
            for (x, y, v) in img.enumerate_pixels() {
                for c in 0..3 {
                    px[c * 256 + (y * 16 + x) as usize] = (v[c] as f32 / 255.0 - mean[c]) / std[c];
                }
            }
            model.image_forward(&params, &mut acts, &px).unwrap();
            let score: f32 = acts
                .text_embeds
                .iter()
                .zip(&acts.image_embeds)
                .map(|(a, b)| a * b)
                .sum();
            let written_score = kept[rank]["score"].as_f64().unwrap() as f32;
            assert!(
                (score - written_score).abs() < 1e-5,
                "prompt {p} rank {rank}: {score} vs {written_score}"
            );
            assert!(
                score <= last,
                "prompt {p}: rank {rank} scores above the one before"
            );
            last = score;
        }
        // No picture left out scores above the kept ones.
        let all: Vec<f32> = written[p]["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(all.len(), 3);
        assert!(all.iter().filter(|&&s| s > last).count() <= 1, "{all:?}");
    }
}

/// Each grid carries its prompt in a band above the pictures: the grid differs from the one
/// drawn with `--no-captions` only in that band, and its cells are the individual pictures.
/// Without a font (`TESSERA_FONT` set empty) one warning says so and the grids have no band.
#[test]
fn a_grid_carries_its_caption_in_a_band_above_the_pictures() {
    let tmp = tempfile::tempdir().unwrap();
    let (run, dvae, tok) = fixtures(tmp.path());
    let args = ["-n", "3", "--seed", "1"];
    let plain = tmp.path().join("plain");
    let o = sample_with(
        &run,
        &dvae,
        &tok,
        &plain,
        &[&args[..], &["--no-captions"][..]].concat(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let grid = |dir: &Path, p: usize| {
        image::open(dir.join(format!("prompt_{p:03}.png")))
            .unwrap()
            .to_rgb8()
    };

    let no_font = tmp.path().join("no-font");
    let o = sample_cmd(&run, &dvae, &tok, &no_font, &args)
        .env("TESSERA_FONT", "")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        stderr.matches("no TrueType font found").count(),
        1,
        "{stderr}"
    );
    for p in 0..2 {
        assert_eq!(grid(&no_font, p), grid(&plain, p), "prompt {p}");
    }

    let Some(font) = trainer::font::find() else {
        eprintln!("note: no TrueType font on this machine; the caption band is not checked");
        assert!(
            std::env::var_os("CI").is_none(),
            "CI needs a font (fonts-dejavu-core) to check captions"
        );
        return;
    };
    let captioned = tmp.path().join("captioned");
    let o = sample_cmd(&run, &dvae, &tok, &captioned, &args)
        .env("TESSERA_FONT", &font)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut band_pixels = Vec::new();
    for p in 0..2 {
        let (c, g) = (grid(&captioned, p), grid(&plain, p));
        assert_eq!(c.width(), g.width());
        assert!(c.height() > g.height(), "prompt {p}: no band");
        let band = c.height() - g.height();
        // Above the band: the top gap; below it: the plain grid, pixel for pixel.
        for x in 0..g.width() {
            for y in 0..4 {
                assert_eq!(
                    c.get_pixel(x, y),
                    g.get_pixel(x, y),
                    "prompt {p} ({x}, {y})"
                );
            }
            for y in 4..g.height() {
                assert_eq!(
                    c.get_pixel(x, y + band),
                    g.get_pixel(x, y),
                    "prompt {p} ({x}, {y}) below the band"
                );
            }
        }
        let inside: Vec<[u8; 3]> = (4..4 + band)
            .flat_map(|y| (0..c.width()).map(move |x| (x, y)))
            .map(|(x, y)| c.get_pixel(x, y).0)
            .collect();
        let dark = inside.iter().filter(|px| px[0] < 128).count();
        assert!(dark > 10, "prompt {p}: {dark} dark pixels in the band");
        band_pixels.push(inside);
        for j in 0..3u32 {
            let one = image::open(captioned.join(format!("prompt_{p:03}_{j:02}.png")))
                .unwrap()
                .to_rgb8();
            let (x0, y0) = (4 + (j % 2) * 20, 4 + band + (j / 2) * 20);
            for (x, y, px) in one.enumerate_pixels() {
                assert_eq!(c.get_pixel(x0 + x, y0 + y), px, "prompt {p} picture {j}");
            }
        }
    }
    assert_ne!(band_pixels[0], band_pixels[1], "two prompts, the same band");
}

/// `--keep` beyond `-n`, `--keep` without `--clip`, and a CLIP directory without its tokenizer
/// are refused, naming the values or the file, before anything is written.
#[test]
fn clip_and_keep_mistakes_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let (run, dvae, tok) = fixtures(tmp.path());
    let clip = clip_dir(tmp.path());
    let out = tmp.path().join("out");
    let c = clip.to_str().unwrap();
    let err = |args: &[&str]| {
        let o = sample_with(&run, &dvae, &tok, &out, args);
        assert!(!o.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = err(&["-n", "3", "--keep", "4", "--clip", c]);
    assert!(e.contains("--keep 4 is larger than -n 3"), "{e}");
    let e = err(&["-n", "3", "--keep", "2"]);
    assert!(e.contains("--keep 2 needs --clip"), "{e}");
    let e = err(&["-n", "3", "--keep", "0", "--clip", c]);
    assert!(e.contains("--keep 0"), "{e}");
    fs::remove_file(clip.join("tokenizer.json")).unwrap();
    let e = err(&["-n", "3", "--clip", c]);
    assert!(e.contains("tokenizer.json"), "{e}");
    let e = err(&[
        "-n",
        "3",
        "--clip",
        tmp.path().join("no-clip").to_str().unwrap(),
    ]);
    assert!(e.contains("no-clip"), "{e}");
    assert!(!out.exists(), "nothing written on error");
}

/// A prompt longer than the text context (6 tokens here) is drawn from its first 6 tokens, as
/// training truncates captions, with a warning that names it; the prompts that fit get none.
#[test]
fn a_prompt_longer_than_the_text_context_is_truncated_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let (run, dvae, tok) = fixtures(tmp.path());
    let long = "red circle above blue square below small large red";
    // `trainer sample` with the test's two prompts and `prompt` third, one picture each into
    // `dir`: its stderr, once it succeeded.
    let draw = |prompt: &str, dir: &str| {
        let args = ["--prompt", prompt, "-n", "1", "--no-captions"];
        let o = sample_with(&run, &dvae, &tok, &tmp.path().join(dir), &args);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{err}");
        err
    };
    let err = draw(long, "out");
    assert!(
        err.contains("prompt 2 (") && err.contains("truncated to its first 6 tokens"),
        "{err}"
    );
    assert!(
        !err.contains("prompt 0 (") && !err.contains("prompt 1 ("),
        "{err}"
    );
    // Drawn from its first 6 tokens: the picture of the text of those 6 tokens, in the same
    // place, with the same seed.
    let bpe = BpeTokenizer::load(&tok).unwrap();
    let ids = bpe.encode(long).unwrap();
    assert!(ids.len() > 6);
    let short = bpe.decode(&ids[..6]).unwrap();
    assert_eq!(bpe.encode(&short).unwrap(), ids[..6]);
    let err = draw(&short, "short");
    assert!(!err.contains("truncated"), "{err}");
    let picture = |dir: &str| fs::read(tmp.path().join(dir).join("prompt_002_00.png")).unwrap();
    assert_eq!(picture("out"), picture("short"));
}

/// A training run with `samples:` draws a grid (a row per prompt) after every `every` updates and
/// after the last, into samples/ and TensorBoard; each of its pictures is what `trainer sample`
/// draws from that update's checkpoint with the same seed; and the run's weights are those of
/// the same run without samples.
#[test]
fn training_draws_sample_grids_that_trainer_sample_reproduces_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dvae, tok) = fixtures(tmp.path());
    let with = tmp.path().join("with");
    let samples = format!(
        "samples:\n  every: 2\n  prompts: [\"red circle above\", \"blue square\"]\n  dvae: {}\n  \
         tokenizer: {}\n  n: 3\n  top_k: 8\n  seed: 5\n",
        dvae.display(),
        tok.display()
    );
    let cfg = RunConfig::from_yaml_str(&format!("{}{samples}", run_yaml(&with, 3)), "t").unwrap();
    trainer::train::run(&cfg, true).unwrap();
    let without = tmp.path().join("without");
    trainer::train::run(
        &RunConfig::from_yaml_str(&run_yaml(&without, 3), "t").unwrap(),
        true,
    )
    .unwrap();
    let weights =
        |run: &Path| fs::read(run.join("checkpoints/step_00000003/model.safetensors")).unwrap();
    assert_eq!(
        weights(&with),
        weights(&without),
        "sampling changed training"
    );

    let mut grids: Vec<String> = fs::read_dir(with.join("samples"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    grids.sort();
    assert_eq!(grids, ["step_00000002.png", "step_00000003.png"]);
    // 3 pictures of 16 px per row, 2 rows, 4-pixel gaps; with a font, each row under a band
    // with its prompt.
    let grid = image::open(with.join("samples/step_00000003.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(grid.width(), 3 * 16 + 4 * 4);

    let out = tmp.path().join("cli");
    let o = sample_batch(&with, &dvae, &tok, &out, "5", "3");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let picture = |p: u32, j: u32| {
        image::open(out.join(format!("prompt_{p:03}_{j:02}.png")))
            .unwrap()
            .to_rgb8()
    };
    let matches = |one: &image::RgbImage, x0: u32, y0: u32| {
        y0 + 16 <= grid.height()
            && one
                .enumerate_pixels()
                .all(|(x, y, px)| grid.get_pixel(x0 + x, y0 + y) == px)
    };
    // The top of each prompt's row: where its first picture is, below the row before.
    let mut tops = Vec::new();
    let mut from = 4;
    for p in 0..2u32 {
        let y0 = (from..grid.height())
            .find(|&y| matches(&picture(p, 0), 4, y))
            .unwrap_or_else(|| panic!("prompt {p}'s first picture is not in the grid"));
        for j in 0..3u32 {
            assert!(
                matches(&picture(p, j), 4 + j * 20, y0),
                "prompt {p} picture {j}"
            );
        }
        tops.push(y0);
        from = y0 + 20;
    }
    assert_eq!(
        grid.height(),
        tops[1] + 16 + 4,
        "a 4-pixel gap below the last row"
    );
    let bands = [tops[0] - 4, tops[1] - tops[0] - 20];
    match trainer::font::find() {
        // A band of text above each row.
        Some(_) => {
            for (p, &band) in bands.iter().enumerate() {
                let y0 = tops[p] - band;
                let dark = (y0..tops[p])
                    .flat_map(|y| (0..grid.width()).map(move |x| (x, y)))
                    .filter(|&(x, y)| grid.get_pixel(x, y).0[0] < 128)
                    .count();
                assert!(
                    band > 0 && dark > 5,
                    "prompt {p}: band {band}, {dark} dark pixels"
                );
            }
        }
        None => assert_eq!(bands, [0, 0], "no font: no band"),
    }

    let events: Vec<_> = fs::read_dir(&with)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
        })
        .collect();
    assert_eq!(events.len(), 1);
    let images: Vec<(i64, Vec<u8>)> = trainer::tensorboard::read_events(&events[0])
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.what {
            Some(trainer::tensorboard::What::Summary(s)) => {
                s.value.into_iter().find_map(|v| match v.kind {
                    Some(trainer::tensorboard::Kind::Image(i)) => {
                        Some((e.step, i.encoded_image_string))
                    }
                    _ => None,
                })
            }
            _ => None,
        })
        .collect();
    assert_eq!(images.iter().map(|i| i.0).collect::<Vec<_>>(), [2, 3]);
    assert_eq!(
        images[1].1,
        fs::read(with.join("samples/step_00000003.png")).unwrap()
    );
}
