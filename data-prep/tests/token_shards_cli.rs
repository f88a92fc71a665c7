//! `data-prep synth-tokens`, `inspect` and `verify` end to end: shards written, a rerun skips
//! finished shards, a corrupt or foreign file fails verification naming the file.

use std::fs;
use std::path::Path;
use std::process::Output;

const CONFIG: &str = "\
run:
  name: synth
  out_dir: runs/unused
  seed: 4
model:
  text_len: 8
  text_vocab: 40
  grid: 4
  image_vocab: 24
  d_model: 32
  heads: 2
  layers: 2
data:
  source: shards
  paths: [data/*.tts]
train:
  steps: 1
  batch_size: 2
";

mod support;
use support::{data_prep, text};

fn synth(cfg: &Path, out: &Path) -> Output {
    data_prep(&[
        "synth-tokens",
        "--config",
        cfg.to_str().unwrap(),
        "--count",
        "25",
        "--shard-size",
        "10",
        "--out",
        out.to_str().unwrap(),
    ])
}

#[test]
fn synth_tokens_then_inspect_and_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("c.yaml");
    fs::write(&cfg, CONFIG).unwrap();
    let out = tmp.path().join("data");
    let o = synth(&cfg, &out);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("25 records") && text(&o).contains("3 shards written, 0 already done")
    );
    let shards: Vec<_> = (0..3)
        .map(|k| out.join(format!("tokens-{k:05}.tts")))
        .collect();
    for s in &shards {
        assert!(s.exists() && Path::new(&format!("{}.done", s.display())).exists());
    }

    // A rerun skips every finished shard, and rewrites one whose marker is missing.
    fs::remove_file(format!("{}.done", shards[1].display())).unwrap();
    let before = fs::read(&shards[1]).unwrap();
    let o = synth(&cfg, &out);
    assert!(
        text(&o).contains("1 shards written, 2 already done"),
        "{}",
        text(&o)
    );
    assert_eq!(
        fs::read(&shards[1]).unwrap(),
        before,
        "synthesis is deterministic"
    );
    // Other samples into the same directory are refused.
    let o = data_prep(&[
        "synth-tokens",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "run.seed=5",
        "--count",
        "25",
        "--shard-size",
        "10",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("tokens-00000.tts holds other samples"),
        "{}",
        text(&o)
    );

    let o = data_prep(&["inspect", shards[2].to_str().unwrap(), "--records", "2"]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("token shard, format version 1"), "{t}");
    assert!(
        t.contains("layout: text_len 8 image_tokens 16 text_vocab 40 image_vocab 24 token_width 2"),
        "{t}"
    );
    assert!(
        t.contains("records: 5 ") && t.contains("record 1: caption \""),
        "{t}"
    );

    let paths: Vec<&str> = shards.iter().map(|p| p.to_str().unwrap()).collect();
    let o = data_prep(&[&["verify"][..], &paths].concat());
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(text(&o).matches("ok ").count(), 3);

    // A flipped record byte: verify fails naming the file, and the other files still pass.
    let mut b = fs::read(&shards[1]).unwrap();
    b[100] ^= 0x40;
    fs::write(&shards[1], b).unwrap();
    let foreign = tmp.path().join("notes.tts");
    fs::write(&foreign, "hello, not a shard").unwrap();
    let o = data_prep(&[&["verify"][..], &paths, &[foreign.to_str().unwrap()]].concat());
    assert_eq!(o.status.code(), Some(1));
    let t = text(&o);
    assert!(
        t.contains("FAILED") && t.contains("tokens-00001.tts: shard"),
        "{t}"
    );
    assert!(t.contains("records checksum mismatch"), "{t}");
    assert!(
        t.contains("notes.tts is not a shard this build knows"),
        "{t}"
    );
    assert!(
        t.contains("error: 2 of 4 shards failed verification"),
        "{t}"
    );
    assert_eq!(t.matches("ok ").count(), 2);
}

/// Two records of a small layout, the second with text ids `second` and caption `caption`.
fn write_two(path: &Path, second: [u32; 4], caption: &str) -> std::path::PathBuf {
    use formats::token_shard::{ShardLayout, TokenShardWriter};
    let layout = ShardLayout {
        text_len: 4,
        text_vocab: 10,
        image_tokens: 4,
        image_vocab: 8,
    };
    let mut w = TokenShardWriter::create(path, layout).unwrap();
    w.push(&[1, 2, 12, 13], &[0, 1, 2, 3], "one two").unwrap();
    w.push(&second, &[4, 5, 6, 7], caption).unwrap();
    w.finish().unwrap()
}

/// `verify` holds the text ids to the format's contract (the caption's ids, then only padding),
/// which the per-id range rules alone let through.
#[test]
fn verify_catches_caption_ids_after_the_padding() {
    let tmp = tempfile::tempdir().unwrap();
    let good = write_two(&tmp.path().join("good.tts"), [3, 11, 12, 13], "three");
    // Position 1 holds its padding id, then position 2 a caption id again.
    let bad = write_two(&tmp.path().join("bad.tts"), [3, 11, 4, 13], "three four");
    let o = data_prep(&["verify", good.to_str().unwrap(), bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("ok ") && t.contains("good.tts"), "{t}");
    assert!(
        t.contains("FAILED")
            && t.contains("bad.tts, record 1: text token 2 is 4, a caption id after the padding"),
        "{t}"
    );
}

/// `inspect` prints captions as JSON strings (quotes, newlines and control characters escaped
/// as JSON, not as Rust's `{:?}`), so none of them reaches the terminal raw.
#[test]
fn inspect_prints_captions_as_json_strings() {
    let tmp = tempfile::tempdir().unwrap();
    let caption = "say \"hi\"\n\u{1b}[31m";
    let path = write_two(&tmp.path().join("c.tts"), [3, 11, 12, 13], caption);
    let o = data_prep(&["inspect", path.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    let json = serde_json::to_string(caption).unwrap();
    assert_eq!(json, "\"say \\\"hi\\\"\\n\\u001b[31m\"");
    assert!(t.contains(&format!("record 1: caption {json}\n")), "{t}");
    assert!(!t.contains('\u{1b}'), "{t}");
}
