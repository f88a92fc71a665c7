//! Bit-exact resume through the real shard loader: 2N updates straight and N updates + resume +
//! N updates over token shards give byte-identical weights, optimizer state and state.json, with
//! epoch boundaries inside the run and the resume in the middle of an epoch.

use formats::token_shard::TokenShardWriter;
use std::fs;
use std::path::{Path, PathBuf};
use trainer::config::RunConfig;
use trainer::data::synthetic::SyntheticData;

fn yaml(out: &Path, data: &Path, steps: u64) -> String {
    yaml_with(out, data, steps, 30, "")
}

/// The run config with `text_vocab` and extra `data:` lines (for BPE dropout).
fn yaml_with(out: &Path, data: &Path, steps: u64, text_vocab: usize, data_extra: &str) -> String {
    format!(
        "run:\n  name: shards\n  out_dir: {}\n  seed: 5\n  device: cpu\n\
         model:\n  text_len: 6\n  text_vocab: {text_vocab}\n  grid: 4\n  image_vocab: 20\n  d_model: 32\n  heads: 2\n  layers: 2\n  conv_kernel: 3\n\
         data:\n  source: shards\n  paths: ['{}/tokens-*.tts']\n  prefetch: 3\n{data_extra}\
         optim:\n  lr: 3.0e-3\n\
         train:\n  steps: {steps}\n  batch_size: 4\n  grad_accum: 2\n  log_every: 1\n\
         checkpoint:\n  every: 3\n  keep_last: 5\n",
        out.display(),
        data.display()
    )
}

/// 20 records in shards of 7, 7 and 6, from the synthetic generator.
fn write_shards(cfg: &RunConfig, dir: &Path) {
    write_shards_with(cfg, dir, |i| format!("sample {i}"))
}

fn write_shards_with(cfg: &RunConfig, dir: &Path, caption: impl Fn(u64) -> String) {
    fs::create_dir_all(dir).unwrap();
    let gen = SyntheticData::from_config(cfg).unwrap();
    let m = cfg.transformer().unwrap();
    let layout = m.shard_layout().unwrap();
    let (tt, gi) = (m.text_len, m.image_tokens());
    let (mut text, mut image) = (vec![0; tt], vec![0; gi]);
    for (k, range) in [0..7u64, 7..14, 14..20].into_iter().enumerate() {
        let mut w =
            TokenShardWriter::create(&dir.join(format!("tokens-{k:05}.tts")), layout).unwrap();
        for i in range {
            gen.sample(i, &mut text, &mut image);
            w.push(&text, &image, &caption(i)).unwrap();
        }
        w.finish().unwrap();
    }
}

fn step_dir(out: &Path, step: u64) -> PathBuf {
    out.join(format!("checkpoints/step_{step:08}"))
}

fn state(out: &Path, step: u64) -> serde_json::Value {
    serde_json::from_slice(&fs::read(step_dir(out, step).join("state.json")).unwrap()).unwrap()
}

#[test]
fn n_steps_resume_n_steps_over_shards_equals_2n_steps_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (straight, resumed) = (tmp.path().join("straight"), tmp.path().join("resumed"));
    let cfg = |out: &Path, steps| RunConfig::from_yaml_str(&yaml(out, &data, steps), "t").unwrap();
    write_shards(&cfg(&straight, 1), &data);

    // 20 records, 8 per update (4 × 2 micro-batches), 5 micro-batches per epoch: the epoch
    // changes inside updates 3 and 5, and the resume at update 3 lands mid-epoch.
    let a = trainer::train::run(&cfg(&straight, 6), true).unwrap();
    assert_eq!(a.final_step, 6);
    let b1 = trainer::train::run(&cfg(&resumed, 3), true).unwrap();
    assert_eq!(b1.final_step, 3);
    let mid = state(&resumed, 3);
    assert_eq!(
        mid["data"],
        serde_json::json!({"source": "shards", "epoch": 1, "position": 4, "records": 20}),
        "{mid}"
    );
    let b2 = trainer::train::run(&cfg(&resumed, 6), true).unwrap();
    assert_eq!((b2.final_step, b2.resumed_from), (6, Some(3)));

    for file in [
        "model.safetensors",
        "optimizer.safetensors",
        "ema.safetensors",
        "state.json",
    ] {
        let x = fs::read(step_dir(&straight, 6).join(file)).unwrap();
        let y = fs::read(step_dir(&resumed, 6).join(file)).unwrap();
        assert!(
            x == y,
            "{file} differs between the straight and the resumed run{}",
            if file.ends_with(".json") {
                format!(
                    ": {} vs {}",
                    String::from_utf8_lossy(&x),
                    String::from_utf8_lossy(&y)
                )
            } else {
                String::new()
            }
        );
    }
    assert_eq!(state(&straight, 6)["data"]["epoch"], 2);
    assert_ne!(
        fs::read(step_dir(&straight, 3).join("model.safetensors")).unwrap(),
        fs::read(step_dir(&straight, 6).join("model.safetensors")).unwrap()
    );
}

#[test]
fn bpe_dropout_changes_the_text_and_resume_stays_bit_exact() {
    use formats::bpe::BpeTokenizer;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let words = [
        "red", "blue", "circle", "square", "above", "below", "small", "large",
    ];
    let caption = |i: u64| {
        (0..4)
            .map(|k| words[((i * 7 + k * 3) % 8) as usize])
            .collect::<Vec<_>>()
            .join(" ")
    };
    let tok = BpeTokenizer::train((0..40).map(caption), 290, 1).unwrap();
    let tok_path = tmp.path().join("tokenizer.json");
    tok.save(&tok_path).unwrap();
    let dropout = format!("  bpe_dropout: 0.5\n  tokenizer: {}\n", tok_path.display());
    let cfg = |out: &Path, steps, extra: &str| {
        RunConfig::from_yaml_str(&yaml_with(out, &data, steps, 300, extra), "t").unwrap()
    };
    let (straight, resumed, plain) = (
        tmp.path().join("straight"),
        tmp.path().join("resumed"),
        tmp.path().join("plain"),
    );
    // Stored text tokens are the captions' own BPE ids, so only dropout can change them.
    let base = cfg(&straight, 1, &dropout);
    fs::create_dir_all(&data).unwrap();
    let layout = base.transformer().unwrap().shard_layout().unwrap();
    let gen = SyntheticData::from_config(&base).unwrap();
    let mut w = TokenShardWriter::create(&data.join("tokens-00000.tts"), layout).unwrap();
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
    let (mut text, mut image) = (vec![0; 6], vec![0; 16]);
    for i in 0..20 {
        gen.sample(i, &mut text, &mut image);
        let ids = formats::bpe::encode_caption(&tok, &caption(i), 6, 300, 0.0, &mut rng).unwrap();
        w.push(&ids, &image, &caption(i)).unwrap();
    }
    w.finish().unwrap();

    trainer::train::run(&cfg(&straight, 6, &dropout), true).unwrap();
    trainer::train::run(&cfg(&resumed, 3, &dropout), true).unwrap();
    trainer::train::run(&cfg(&resumed, 6, &dropout), true).unwrap();
    trainer::train::run(&cfg(&plain, 6, ""), true).unwrap();
    let model = |out: &Path| fs::read(step_dir(out, 6).join("model.safetensors")).unwrap();
    assert!(
        model(&straight) == model(&resumed),
        "dropout run not bit-exact across resume"
    );
    assert!(
        model(&straight) != model(&plain),
        "dropout 0.5 left every caption unchanged"
    );
}

#[test]
fn resume_refuses_changed_shards_and_a_changed_source() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let out = tmp.path().join("run");
    let cfg = |steps| RunConfig::from_yaml_str(&yaml(&out, &data, steps), "t").unwrap();
    write_shards(&cfg(1), &data);
    trainer::train::run(&cfg(3), true).unwrap();
    // One shard more: the record count of the saved cursor no longer matches.
    fs::copy(data.join("tokens-00000.tts"), data.join("tokens-00003.tts")).unwrap();
    let e = format!("{:#}", trainer::train::run(&cfg(4), true).unwrap_err());
    assert!(
        e.contains("counts 20 records, but data.paths now matches 27"),
        "{e}"
    );
    fs::remove_file(data.join("tokens-00003.tts")).unwrap();
    let synthetic = yaml(&out, &data, 4).replace(
        &format!(
            "  source: shards\n  paths: ['{}/tokens-*.tts']\n  prefetch: 3\n",
            data.display()
        ),
        "  source: synthetic\n",
    );
    let e = format!(
        "{:#}",
        trainer::train::run(&RunConfig::from_yaml_str(&synthetic, "t").unwrap(), true).unwrap_err()
    );
    assert!(
        e.contains(
            "data cursor is for data.source: shards, but the config has data.source: synthetic"
        ),
        "{e}"
    );
}

#[test]
fn a_shard_of_another_layout_or_a_missing_glob_stops_the_run_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let out = tmp.path().join("run");
    let c = RunConfig::from_yaml_str(&yaml(&out, &data, 2), "t").unwrap();
    let e = format!("{:#}", trainer::train::run(&c, true).unwrap_err());
    assert!(e.contains("tokens-*.tts' matches no .tts shard"), "{e}");
    write_shards(&c, &data);
    let mut other = c.clone();
    other.model.transformer_mut().unwrap().text_len = 8;
    let e = format!("{:#}", trainer::train::run(&other, true).unwrap_err());
    assert!(
        e.contains("tokens-00000.tts has text_len 6, the config model.text_len 8"),
        "{e}"
    );
}
