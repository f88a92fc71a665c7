//! `data-prep encode` end to end through the binary: synth → ingest → tokenizer → a fresh dVAE →
//! token shards that verify, that a stage-2 config's layout reads, and whose codes and caption ids
//! are the library's; a rerun redoes only what is missing; bad input fails before any work.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::SystemTime;

use formats::bpe::{encode_caption, BpeTokenizer};
use formats::image_shard::{ImageShard, ImageShardWriter};
use formats::token_shard::TokenShard;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use trainer::checkpoint::{entries, write_tensors};
use trainer::config::RunConfig;
use trainer::data::image_loader::hwc_to_chw;
use trainer::data::loader::ShardSet;
use trainer::model::dvae::{Dvae, DvaeDims};

const RES: usize = 64;
const K: usize = 32;
const TEXT_LEN: usize = 12;
const TEXT_VOCAB: usize = 512;

mod support;
use support::{data_prep, ok, text};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Synthetic shapes at `res` px, ingested into shards of 4 records.
fn image_shards(root: &Path, name: &str, count: usize, res: usize) -> PathBuf {
    let synth = root.join(format!("{name}-synth"));
    let shards = root.join(name);
    ok(data_prep(&[
        "synth",
        "--quiet",
        "--count",
        &count.to_string(),
        "--resolution",
        &res.to_string(),
        "--out",
        s(&synth),
    ]));
    ok(data_prep(&[
        "ingest",
        "--quiet",
        "--input",
        s(&synth),
        "--out",
        s(&shards),
        "--resolution",
        &res.to_string(),
        "--shard-size",
        "4",
    ]));
    shards
}

fn dims() -> DvaeDims {
    DvaeDims {
        resolution: RES,
        n_hid: 8,
        n_blk_per_group: 1,
        vocab_size: K,
        n_init: 8,
    }
}

/// Fresh dVAE weights. The encoder's biases are zeroed: at initialisation they, not the image,
/// decide the argmax, and every code of these flat-coloured images would be the same.
fn dvae_weights(path: &Path) -> (Dvae, Vec<f32>) {
    let m = Dvae::new(dims()).unwrap();
    let mut w = m.init_params(11);
    for spec in m.table().specs() {
        if spec.name.starts_with("encoder.") && spec.name.ends_with(".b") {
            w[spec.range()].fill(0.0);
        }
    }
    write_tensors(path, &entries(m.table(), "", &w)).unwrap();
    (m, w)
}

fn encode(images: &Path, tok: &Path, dvae: &Path, out: &Path, extra: &[&str]) -> Output {
    let pattern = format!("{}/*.tis", images.display());
    let mut args = vec![
        "encode",
        "--quiet",
        "--images",
        &pattern,
        "--tokenizer",
        s(tok),
        "--dvae",
        s(dvae),
        "--out",
        s(out),
    ];
    args.extend_from_slice(extra);
    data_prep(&args)
}

const SIZES: [&str; 6] = ["--text-len", "12", "--text-vocab", "512", "--batch", "3"];

fn tts_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "tts"))
        .collect();
    v.sort();
    v
}

fn stage2_config(dir: &Path, grid: usize) -> PathBuf {
    let path = dir.join(format!("stage2-grid{grid}.yaml"));
    let yaml = format!(
        "run:\n  name: stage2\n  out_dir: {}\n  seed: 1\n\
         model:\n  text_len: {TEXT_LEN}\n  text_vocab: {TEXT_VOCAB}\n  grid: {grid}\n  image_vocab: {K}\n  d_model: 16\n  heads: 2\n  layers: 2\n\
         data:\n  source: shards\n  paths: [{}/*.tts]\n\
         train:\n  steps: 1\n  batch_size: 2\n",
        dir.join("run").display(),
        dir.join("tokens").display()
    );
    fs::write(&path, yaml).unwrap();
    path
}

#[test]
fn encode_writes_token_shards_of_the_dvae_codes_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let images = image_shards(root, "shards", 10, RES);
    let tok = root.join("tokenizer.json");
    ok(data_prep(&[
        "tokenizer",
        "train",
        "--input",
        s(&root.join("shards-synth")),
        "--vocab-size",
        "300",
        "--out",
        s(&tok),
    ]));
    let weights = root.join("dvae.safetensors");
    let (m, w) = dvae_weights(&weights);
    let out = root.join("tokens");
    let log = ok(encode(&images, &tok, &weights, &out, &SIZES));
    assert!(
        log.contains("10 records in 3 token shards") && log.contains("3 written, 0 reused"),
        "{log}"
    );

    // Every shard verifies.
    let files = tts_files(&out);
    assert_eq!(files.len(), 3);
    let mut args = vec!["verify"];
    args.extend(files.iter().map(|p| s(p)));
    ok(data_prep(&args));

    // A stage-2 config with these sizes reads them.
    let cfg = RunConfig::load(&stage2_config(root, RES / 8), &[]).unwrap();
    let layout = cfg.transformer().unwrap().shard_layout().unwrap();
    let set = ShardSet::open(&files, &layout).unwrap();
    assert_eq!(set.len(), 10);

    // Codes, caption ids and captions are the library's, record by record, in input order.
    let tokenizer = BpeTokenizer::load(&tok).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut distinct = std::collections::BTreeSet::new();
    for (i, file) in files.iter().enumerate() {
        let src = ImageShard::open(images.join(format!("images-{i:05}.tis"))).unwrap();
        let dst = TokenShard::open(file).unwrap();
        assert_eq!(dst.len(), src.len());
        for r in 0..src.len() {
            let rec = src.record(r).unwrap();
            let mut x = vec![0.0f32; 3 * RES * RES];
            hwc_to_chw(&rec.pixels, &mut x);
            let codes = m.encode(&w, &x).unwrap();
            let ids = encode_caption(
                &tokenizer,
                &rec.caption,
                TEXT_LEN,
                TEXT_VOCAB,
                0.0,
                &mut rng,
            )
            .unwrap();
            let got = dst.record(r).unwrap();
            assert_eq!(got.image.to_vec(), codes, "{} record {r}", file.display());
            assert_eq!(got.text.to_vec(), ids, "{} record {r}", file.display());
            assert_eq!(got.caption, rec.caption);
            distinct.extend(codes);
        }
    }
    eprintln!("{} distinct codes", distinct.len());
    assert!(distinct.len() > 1, "all codes alike: {distinct:?}");

    // The same sizes through --config give the same bytes.
    let via_config = root.join("tokens-config");
    let cfg_path = stage2_config(root, RES / 8);
    ok(encode(
        &images,
        &tok,
        &weights,
        &via_config,
        &["--config", s(&cfg_path)],
    ));
    for f in &files {
        let name = f.file_name().unwrap();
        assert_eq!(
            fs::read(f).unwrap(),
            fs::read(via_config.join(name)).unwrap()
        );
    }

    // Rerun after deleting one shard: only it is written again, byte for byte.
    let mtime = |p: &Path| fs::metadata(p).unwrap().modified().unwrap();
    let before: Vec<(Vec<u8>, SystemTime)> = files
        .iter()
        .map(|f| (fs::read(f).unwrap(), mtime(f)))
        .collect();
    fs::remove_file(&files[1]).unwrap();
    let log = ok(encode(&images, &tok, &weights, &out, &SIZES));
    assert!(log.contains("1 written, 2 reused"), "{log}");
    for (f, (bytes, t)) in files.iter().zip(&before) {
        assert_eq!(&fs::read(f).unwrap(), bytes, "{}", f.display());
        if f != &files[1] {
            assert_eq!(mtime(f), *t, "{} was rewritten", f.display());
        }
    }

    // An interrupted write: a partial .tmp and no marker. The rerun rewrites that shard.
    let done = PathBuf::from(format!("{}.done", files[2].display()));
    fs::remove_file(&done).unwrap();
    fs::write(format!("{}.tmp", files[2].display()), b"partial").unwrap();
    let log = ok(encode(&images, &tok, &weights, &out, &SIZES));
    assert!(log.contains("1 written, 2 reused"), "{log}");
    assert_eq!(fs::read(&files[2]).unwrap(), before[2].0);
    assert!(done.exists() && !Path::new(&format!("{}.tmp", files[2].display())).exists());

    // An input shard with no records (an ingest group whose inputs were all rejected) has no
    // output: a token shard cannot be empty.
    ImageShardWriter::create(images.join("images-00099.tis"), RES as u32, 4, 3)
        .unwrap()
        .finish()
        .unwrap();
    let log = ok(encode(&images, &tok, &weights, &out, &SIZES));
    assert!(
        log.contains("10 records in 3 token shards")
            && log.contains("0 written, 3 reused, 1 empty input shards skipped"),
        "{log}"
    );
    assert!(!out.join("images-00099.tts").exists());

    // A rerun with other sizes into the same folder would mix two data sets: refused.
    let o = encode(
        &images,
        &tok,
        &weights,
        &out,
        &["--text-len", "10", "--text-vocab", "512"],
    );
    let e = text(&o);
    assert!(
        !o.status.success() && e.contains("written from other inputs or options"),
        "{e}"
    );
    assert_eq!(fs::read(&files[0]).unwrap(), before[0].0);
}

#[test]
fn inputs_that_do_not_fit_are_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let images = image_shards(root, "shards", 4, RES);
    let tok = root.join("tokenizer.json");
    ok(data_prep(&[
        "tokenizer",
        "train",
        "--input",
        s(&root.join("shards-synth")),
        "--vocab-size",
        "300",
        "--out",
        s(&tok),
    ]));
    let vocab = BpeTokenizer::load(&tok).unwrap().vocab_size();
    assert!(vocab > 256, "{vocab}");
    let weights = root.join("dvae.safetensors");
    dvae_weights(&weights);
    let out = root.join("never");
    let refused = |o: Output, needles: &[&str]| {
        let e = text(&o);
        assert!(!o.status.success(), "{e}");
        for n in needles {
            assert!(e.contains(n), "{n:?} not in: {e}");
        }
        assert!(!out.exists(), "work started: {e}");
    };

    // A tokenizer with more ids than the text vocabulary.
    refused(
        encode(
            &images,
            &tok,
            &weights,
            &out,
            &["--text-len", "8", "--text-vocab", "256"],
        ),
        &[
            "tokenizer.json",
            &format!("has {vocab} ids"),
            "--text-vocab is 256",
        ],
    );
    // A stage-2 image vocabulary that is not the dVAE's K.
    refused(
        encode(
            &images,
            &tok,
            &weights,
            &out,
            &["--text-len", "8", "--image-vocab", "64"],
        ),
        &["--image-vocab is 64", "dvae.safetensors", "K = 32"],
    );
    // A stage-2 config whose grid the images do not give.
    let cfg = stage2_config(root, 4);
    refused(
        encode(&images, &tok, &weights, &out, &["--config", s(&cfg)]),
        &["model.grid is 4", "64×64", "8×8 grid"],
    );
    // Images a dVAE cannot take: 60 px.
    let odd = image_shards(root, "odd", 2, 60);
    refused(
        encode(&odd, &tok, &weights, &out, &["--text-len", "8"]),
        &["images-00000.tis", "60×60", "divisible by 8"],
    );
    // Two resolutions in one set.
    let mixed = root.join("mixed");
    fs::create_dir_all(&mixed).unwrap();
    fs::copy(images.join("images-00000.tis"), mixed.join("a.tis")).unwrap();
    let small = image_shards(root, "small", 2, 32);
    fs::copy(small.join("images-00000.tis"), mixed.join("b.tis")).unwrap();
    refused(
        encode(&mixed, &tok, &weights, &out, &["--text-len", "8"]),
        &["b.tis", "32×32", "a.tis", "64×64"],
    );
    // Weights that are not a dVAE's.
    let bad = root.join("bad.safetensors");
    let m = Dvae::new(dims()).unwrap();
    let w = m.init_params(1);
    let mut t = entries(m.table(), "", &w);
    t.retain(|e| e.name != "encoder.blocks.input.w");
    write_tensors(&bad, &t).unwrap();
    refused(
        encode(&images, &tok, &bad, &out, &["--text-len", "8"]),
        &["bad.safetensors", "encoder.blocks.input.w"],
    );
    // No image shards.
    refused(
        encode(
            &root.join("none"),
            &tok,
            &weights,
            &out,
            &["--text-len", "8"],
        ),
        &["--images", "none/*.tis", "matches no .tis file"],
    );
    // No --text-len and no --config.
    let o = encode(&images, &tok, &weights, &out, &[]);
    assert!(
        !o.status.success() && text(&o).contains("--text-len"),
        "{}",
        text(&o)
    );
}
