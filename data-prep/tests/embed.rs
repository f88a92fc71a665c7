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
}
