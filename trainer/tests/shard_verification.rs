//! Token shards are verified on first use: a shard whose id was flipped to another valid id (a
//! change the per-id range check cannot see) stops training with an error naming the shard,
//! unless `data.verify: false`, which trains on it.

use std::fs;
use std::path::{Path, PathBuf};

use formats::token_shard::{TokenShard, TokenShardWriter};
use trainer::config::RunConfig;
use trainer::data::synthetic::SyntheticData;

mod support;
use support::{
    assert_error_exit, output_text as text, small_run_config as config, trainer_logged as trainer,
};

/// Token shards of `cfg`'s model in `dir`: two shards of 6 records from the synthetic generator.
fn write_shards(cfg: &RunConfig, dir: &Path) -> Vec<PathBuf> {
    fs::create_dir_all(dir).unwrap();
    let gen = SyntheticData::from_config(cfg).unwrap();
    let m = cfg.transformer().unwrap();
    let layout = m.shard_layout().unwrap();
    let (mut text, mut image) = (vec![0; m.text_len], vec![0; m.image_tokens()]);
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
