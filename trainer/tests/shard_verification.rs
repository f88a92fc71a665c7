//! Token shards are verified on first use: a shard whose id was flipped to another valid id (a
//! change the per-id range check cannot see) stops training with an error naming the shard,
//! unless `data.verify: false`, which trains on it.

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use trainer::config::RunConfig;
use trainer::data::synthetic::SyntheticData;
use trainer::data::token_shard::{ShardLayout, TokenShard, TokenShardWriter};

fn config(out: &Path, data: &str) -> String {
    format!(
        "run:\n  name: bounds\n  out_dir: {}\n  seed: 2\n  device: cpu\n\
         model:\n  text_len: 6\n  text_vocab: 30\n  grid: 4\n  image_vocab: 20\n  d_model: 16\n  heads: 2\n  layers: 1\n  conv_kernel: 3\n\
         data:\n{data}\
         train:\n  steps: 2\n  batch_size: 2\n  log_every: 1\n\
         checkpoint:\n  every: 0\n",
        out.display()
    )
}

fn trainer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(args)
        .env_remove("TESSERA_SKIP_MEMORY_CHECK")
        .env_remove("LOCAL_WORLD_SIZE")
        .env("RUST_LOG", "info")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Exit status 1 with an error, not a signal (an abort is SIGABRT, no exit code).
fn assert_error_exit(o: &Output, what: &str) {
    assert_eq!(
        o.status.signal(),
        None,
        "{what}: killed by a signal: {}",
        text(o)
    );
    assert_eq!(o.status.code(), Some(1), "{what}: {}", text(o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("error: "),
        "{what}: {}",
        text(o)
    );
}

/// Token shards of `cfg`'s model in `dir`: two shards of 6 records from the synthetic generator.
fn write_shards(cfg: &RunConfig, dir: &Path) -> Vec<PathBuf> {
    fs::create_dir_all(dir).unwrap();
    let gen = SyntheticData::from_config(cfg).unwrap();
    let m = cfg.transformer().unwrap();
    let layout = ShardLayout::from_model(m).unwrap();
    let (mut text, mut image) = (vec![0; m.text_len], vec![0; m.image_len()]);
    (0..2u64)
        .map(|k| {
            let path = dir.join(format!("tokens-{k:05}.tts"));
            let mut w = TokenShardWriter::create(&path, layout).unwrap();
            for i in 6 * k..6 * (k + 1) {
                gen.sample(i, &mut text, &mut image);
                w.push(&text, &image, &format!("sample {i}")).unwrap();
            }
            w.finish().unwrap()
        })
        .collect()
}

#[test]
fn a_flipped_in_range_token_id_stops_training_unless_verify_is_off() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let out = tmp.path().join("run");
    let cfg_path = tmp.path().join("c.yaml");
    let data_yaml = format!(
        "  source: shards\n  paths: ['{}/tokens-*.tts']\n",
        data.display()
    );
    let yaml = config(&out, &data_yaml);
    fs::write(&cfg_path, &yaml).unwrap();
    let cfg = RunConfig::from_yaml_str(&yaml, "c.yaml").unwrap();
    assert!(matches!(&cfg.data, trainer::config::DataSource::Shards(s) if s.verify));
    let shards = write_shards(&cfg, &data);

    // Record 3 of the second shard: its first image id becomes another id in [0, Vi).
    let victim = &shards[1];
    let (w, tt, rs) = {
        let s = TokenShard::open(victim).unwrap();
        let h = *s.header();
        (
            h.token_width as usize,
            h.layout.text_len as usize,
            h.record_size as usize,
        )
    };
    let mut bytes = fs::read(victim).unwrap();
    let at = 80 + 3 * rs + tt * w;
    let id = u16::from_le_bytes([bytes[at], bytes[at + 1]]);
    let flipped = (id + 7) % 20;
    bytes[at..at + 2].copy_from_slice(&flipped.to_le_bytes());
    fs::write(victim, &bytes).unwrap();
    // Every id is still in range: only the checksum can tell.
    let s = TokenShard::open(victim).unwrap();
    let mut t = vec![0; tt];
    let mut im = vec![0; 16];
    for i in 0..s.len() {
        s.read_tokens(i, &mut t, &mut im).unwrap();
    }
    assert!(s
        .verify()
        .unwrap_err()
        .to_string()
        .contains("records checksum"));

    // 12 updates of 2 records: two epochs of the 12 records, so the bad shard is read for sure.
    let o = trainer(&[
        "train",
        "--config",
        cfg_path.to_str().unwrap(),
        "--set",
        "train.steps=12",
    ]);
    assert_error_exit(&o, "flipped id");
    let e = text(&o);
    assert!(
        e.contains("tokens-00001.tts") && e.contains("records checksum mismatch"),
        "{e}"
    );
    let metrics = fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default();
    assert!(
        metrics.lines().count() < 12,
        "the run finished on corrupt data: {metrics}"
    );

    // Trusted data: the check is off and the run trains.
    fs::remove_dir_all(&out).ok();
    let o = trainer(&[
        "train",
        "--config",
        cfg_path.to_str().unwrap(),
        "--set",
        "train.steps=12",
        "--set",
        "data.verify=false",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let metrics = fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 12, "{metrics}");
}
