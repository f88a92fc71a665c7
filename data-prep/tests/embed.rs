//! `data-prep embed` through the binary: the vectors are the library's CLIP embeddings of the
//! records, in record order, unit length, with caption vectors beside them; a rerun embeds only
//! the missing shards; another model into the same folder is refused naming its manifest.

use serde_json::Value;
use trainer::model::clip::hf;

#[path = "support/clip.rs"]
mod clip;
mod support;
use clip::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use support::{ok, text};

#[test]
fn embed_is_aligned_resumable_and_refuses_another_model() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |n: &str| tmp.path().join(n);
    let model = write_model(&p("model"), 3, MODEL);
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let imgs: Vec<_> = (0..20).map(|_| field(&mut rng)).collect();
    write_shards(&p("train"), "images", &imgs, 8);
    let first = ok(embed(&model, &p("train"), &p("emb"), &["--captions"]));
    assert!(
        first.contains("20 records in 3 shards") && first.contains("3 written, 0 reused"),
        "{first}"
    );

    // Aligned with the records: record 5 of shard 1 is the library's embedding of image 13.
    let clip = hf::load_dir(&model).unwrap();
    let (px, _, _) = clip.preprocessor.apply(&imgs[13]).unwrap();
    let mut acts = trainer::model::clip::Activations::new(&clip.model, 1, 8).unwrap();
    clip.model
        .image_forward(&clip.params, &mut acts, &px)
        .unwrap();
    let v = vectors(&p("emb"));
    assert_eq!(v.len(), 20);
    for (a, b) in v[13].iter().zip(&acts.image_embeds) {
        assert!((a - b).abs() < 2e-3, "{a} vs {b}");
    }
    for row in &v {
        let norm = cos(row, row).sqrt();
        assert!((norm - 1.0).abs() < 2e-3, "{norm}");
    }
    let m: Value = serde_json::from_slice(&std::fs::read(p("emb/manifest.json")).unwrap()).unwrap();
    assert_eq!(
        (m["dim"].as_u64(), m["records"].as_u64()),
        (Some(256), Some(20))
    );
    assert_eq!(m["model_kind"], "hugging-face");
    let bytes = std::fs::read(p("emb/images-00001.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("caption").unwrap().shape(), [8, 256]);

    // Resume: only the missing shard is embedded again.
    std::fs::remove_file(p("emb/images-00002.safetensors")).unwrap();
    let again = ok(embed(&model, &p("train"), &p("emb"), &["--captions"]));
    assert!(again.contains("1 written, 2 reused"), "{again}");
    // Another model into the same folder is refused, naming the manifest.
    let other = write_model(&p("model2"), 4, MODEL);
    let e = text(&embed(&other, &p("train"), &p("emb"), &["--captions"]));
    assert!(
        e.contains("emb/manifest.json") && e.contains("use a new --out"),
        "{e}"
    );
    // So is the same model in the other precision, naming both.
    let e = text(&embed(
        &model,
        &p("train"),
        &p("emb"),
        &["--captions", "--precision", "bf16"],
    ));
    assert!(
        e.contains("precision fp32 then, bf16 now") && e.contains("use a new --out"),
        "{e}"
    );

    // bf16 products: the same records within bf16's rounding of the fp32 vectors, marked as such.
    let out = ok(embed(
        &model,
        &p("train"),
        &p("bf16"),
        &["--precision", "bf16"],
    ));
    assert!(out.contains("3 written"), "{out}");
    let w = vectors(&p("bf16"));
    assert_eq!(w.len(), 20);
    for (i, (a, b)) in v.iter().zip(&w).enumerate() {
        let c = cos(a, b);
        assert!(
            c > 0.999 && a != b,
            "record {i}: cosine {c} between bf16 and fp32"
        );
    }
    let m: Value =
        serde_json::from_slice(&std::fs::read(p("bf16/manifest.json")).unwrap()).unwrap();
    assert_eq!(m["precision"], "bf16");
    let bytes = std::fs::read(p("bf16/images-00000.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap()["precision"], "bf16");

    // The vision tower on the emulated GPU: the CPU's vectors to f16 rounding (the captions'
    // tower stays on the CPU: the same bytes).
    let out = ok(embed(
        &model,
        &p("train"),
        &p("emu"),
        &["--captions", "--device", "cuda-emu"],
    ));
    assert!(
        out.contains("3 written") && out.contains("the vision tower runs on emulated CUDA"),
        "{out}"
    );
    let e = vectors(&p("emu"));
    assert_eq!(e.len(), 20);
    for (i, (a, b)) in v.iter().zip(&e).enumerate() {
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(
            worst <= 1e-3,
            "record {i}: |cpu − emulated GPU| up to {worst}"
        );
    }
    let caption = |dir: &str| {
        let bytes = std::fs::read(p(&format!("{dir}/images-00001.safetensors"))).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensor("caption").unwrap().data().to_vec()
    };
    assert_eq!(caption("emu"), caption("emb"));
    // bf16 products are the CPU's only.
    let e = text(&embed(
        &model,
        &p("train"),
        &p("emu-bf16"),
        &["--device", "cuda-emu", "--precision", "bf16"],
    ));
    assert!(e.contains("runs on the CPU only"), "{e}");
}

/// A Tessera `model.kind: clip` run as `--model`: the newest checkpoint's weights and config
/// (its `data.tokenizer` for the captions), the shards' pixels normalised with CLIP's statistics
/// as in training.
#[test]
fn a_tessera_clip_run_is_embedded_with_its_checkpoint() {
    use trainer::config::RunConfig;
    use trainer::model::clip::{Activations, Clip};
    let tmp = tempfile::tempdir().unwrap();
    let p = |n: &str| tmp.path().join(n);
    let (files, shards, tok, run) = (p("files"), p("shards"), p("tokenizer.json"), p("run"));
    ok(support::data_prep(&[
        "synth",
        "--count",
        "12",
        "--resolution",
        "32",
        "--seed",
        "5",
        "--out",
        s(&files),
        "--quiet",
    ]));
    ok(support::data_prep(&[
        "ingest",
        "--input",
        s(&files),
        "--out",
        s(&shards),
        "--resolution",
        "32",
        "--shard-size",
        "8",
        "--quiet",
    ]));
    ok(support::data_prep(&[
        "tokenizer",
        "train",
        "--input",
        s(&files),
        "--vocab-size",
        "400",
        "--out",
        s(&tok),
    ]));
    let yaml = format!(
        "run: {{ name: c, out_dir: {run}, seed: 3, device: cpu }}
model:
  kind: clip
  projection_dim: 16
  text_config: {{ vocab_size: 402, hidden_size: 16, intermediate_size: 32,
    num_attention_heads: 2, num_hidden_layers: 1, max_position_embeddings: 12,
    eos_token_id: 401, hidden_act: quick_gelu }}
  vision_config: {{ hidden_size: 16, intermediate_size: 32, num_attention_heads: 2,
    num_hidden_layers: 1, image_size: 32, patch_size: 8, hidden_act: quick_gelu }}
data: {{ source: images, paths: [\"{shards}/*.tis\"], tokenizer: {tok} }}
train: {{ steps: 2, batch_size: 4, log_every: 1 }}
",
        run = run.display(),
        shards = shards.display(),
        tok = tok.display()
    );
    let cfg = RunConfig::from_yaml_str(&yaml, "t").unwrap();
    trainer::train::run(&cfg, true).unwrap();
    ok(embed(&run, &shards, &p("emb"), &["--captions"]));
    let m: Value = serde_json::from_slice(&std::fs::read(p("emb/manifest.json")).unwrap()).unwrap();
    assert_eq!(m["model_kind"], "tessera");
    assert_eq!(
        (m["dim"].as_u64(), m["records"].as_u64()),
        (Some(16), Some(12))
    );

    // Record 3 of the first shard through the library, from the checkpoint's weights.
    let ckpt = trainer::checkpoint::latest_complete(&run).unwrap().unwrap();
    let model = Clip::new(*cfg.model.clip().unwrap()).unwrap();
    let params = hf::read_weights(&ckpt.join("model.safetensors"), &model).unwrap();
    let rec = formats::image_shard::ImageShard::open(shards.join("images-00000.tis"))
        .unwrap()
        .record(3)
        .unwrap();
    let mut px = vec![0.0f32; 3 * 32 * 32];
    trainer::data::image_loader::hwc_to_chw(&rec.pixels, &mut px);
    let (mean, std) = (
        [0.481_454_66, 0.457_827_5, 0.408_210_73],
        [0.268_629_54, 0.261_302_6, 0.275_777_1],
    );
    for (c, plane) in px.chunks_exact_mut(32 * 32).enumerate() {
        plane.iter_mut().for_each(|v| *v = (*v - mean[c]) / std[c]);
    }
    let mut acts = Activations::new(&model, 1, 12).unwrap();
    model.image_forward(&params, &mut acts, &px).unwrap();
    for (a, b) in vectors(&p("emb"))[3].iter().zip(&acts.image_embeds) {
        assert!((a - b).abs() < 2e-3, "{a} vs {b}");
    }
}
