//! `trainer sample` end to end: a tiny transformer trained for two updates, a dVAE with fresh
//! weights and a tokenizer trained on the spot; pictures, grids and index.json come out,
//! identical for a seed; bad paths are errors that name them. And the sample grids a training
//! run draws (`samples:`).

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
        .args(["--batch", batch, "--seed", seed, "--top-k", "8", "--out"])
        .arg(out)
        .output()
        .unwrap()
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
    // 3 pictures of 16 px per row, 2 rows, 4-pixel gaps.
    let grid = image::open(with.join("samples/step_00000003.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(grid.dimensions(), (3 * 16 + 4 * 4, 2 * 16 + 3 * 4));

    let out = tmp.path().join("cli");
    let o = sample_batch(&with, &dvae, &tok, &out, "5", "3");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for p in 0..2u32 {
        for j in 0..3u32 {
            let one = image::open(out.join(format!("prompt_{p:03}_{j:02}.png")))
                .unwrap()
                .to_rgb8();
            let (x0, y0) = (4 + j * 20, 4 + p * 20);
            for (x, y, px) in one.enumerate_pixels() {
                assert_eq!(
                    grid.get_pixel(x0 + x, y0 + y),
                    px,
                    "prompt {p} picture {j} at ({x}, {y})"
                );
            }
        }
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
