//! Benchmark (ignored; prints, never asserts a time): images embedded per second by a ViT-B/32
//! CLIP (Hugging Face's default sizes, random weights) at 224×224 on the CPU, beside Hugging
//! Face's `CLIPModel` in PyTorch on the same weights and pixels in the same run.
//!
//! ```sh
//! cargo test --release -p data-prep --test bench_embed -- --ignored --nocapture
//! TORCH_PYTHON=/path/to/python cargo test --release …   # default /tmp/torchvenv/bin/python
//! ```
//!
//! `--release`: the test profile keeps debug assertions in Tessera's crates (and, before
//! 2026-12-07, in the `gemm` crate too, which made its products 2.5× slower); the benchmark
//! says so when it was built with them.
//!
//! Each in both precisions (fp32, and bf16 products: `data-prep embed --precision bf16`): Tessera's
//! vision tower alone (`Clip::image_forward`, batches of 32, median of 5 after a warm-up),
//! `data-prep embed` end to end on 160 records (shard decoding, bicubic preprocessing, forward,
//! f16 files), and PyTorch (`tools/bench_clip_pytorch.py`, the same pixels,
//! `get_image_features` + normalisation, as many threads as rayon uses; bf16 under PyTorch's CPU
//! autocast). Also printed: the smallest cosine between an image's bf16 and fp32 embeddings.

use std::path::Path;
use std::time::Instant;

use formats::image_shard::ImageShardWriter;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use trainer::checkpoint::{entries, write_tensors};
use trainer::model::clip::{hf, Activations, Clip, ClipDims, Products};

#[path = "support/clip.rs"]
mod clip;
mod support;
use clip::{field, s, tokenizer_json};
use support::{data_prep, ok};

const SIDE: u32 = 224;
const BATCH: usize = 32;

/// Hugging Face's default `CLIPConfig`: ViT-B/32 and the 12-layer text transformer.
fn vit_b32(dir: &Path) -> ClipDims {
    let path = dir.join("config.json");
    std::fs::write(&path, "{}").unwrap();
    hf::read_config(&path).unwrap().0
}

/// A `.npy` file of f32 values of `shape` (NumPy's format version 1.0).
fn write_npy(path: &Path, shape: &[usize], v: &[f32]) {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({},), }}",
        dims.join(", ")
    );
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    bytes.extend(v.iter().flat_map(|x| x.to_le_bytes()));
    std::fs::write(path, bytes).unwrap();
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
#[ignore = "benchmark: a ViT-B/32 beside PyTorch, minutes on 2 cores; run with --ignored --nocapture"]
fn bench_embed_vit_b32_beside_pytorch() {
    if cfg!(debug_assertions) {
        eprintln!(
            "built with debug assertions: the times are not the release build's (use --release)"
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vit-b32");
    std::fs::create_dir_all(&dir).unwrap();
    let dims = vit_b32(&dir);
    hf::write_config(
        &dir.join("config.json"),
        &dims,
        hf::DEFAULT_LOGIT_SCALE_INIT,
    )
    .unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json().to_string()).unwrap();
    let pre = json!({
        "crop_size": {"height": SIDE, "width": SIDE}, "do_center_crop": true,
        "do_normalize": true, "do_rescale": true, "do_resize": true, "resample": 3,
        "rescale_factor": 1.0 / 255.0, "size": {"shortest_edge": SIDE}
    });
    std::fs::write(dir.join("preprocessor_config.json"), pre.to_string()).unwrap();
    let model = Clip::new(dims).unwrap();
    let params = model.init_params(0, hf::DEFAULT_LOGIT_SCALE_INIT);
    write_tensors(
        &dir.join("model.safetensors"),
        &entries(model.table(), "", &params),
    )
    .unwrap();
    let clip = hf::load_dir(&dir).unwrap();

    // 160 images at 224 px: a shard for `embed`, and the first 32 preprocessed.
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let small: Vec<_> = (0..160).map(|_| field(&mut rng)).collect();
    let images: Vec<image::RgbImage> = small
        .iter()
        .map(|f| image::imageops::resize(f, SIDE, SIDE, image::imageops::FilterType::Triangle))
        .collect();
    let shards = tmp.path().join("shards");
    std::fs::create_dir_all(&shards).unwrap();
    let mut w = ImageShardWriter::create(shards.join("images-00000.tis"), SIDE, 32, 3).unwrap();
    for img in &images {
        w.push(img.as_raw(), "a random colour field", None).unwrap();
    }
    w.finish().unwrap();
    let mut pixels = Vec::new();
    for img in &images[..BATCH] {
        pixels.extend(clip.preprocessor.apply(img).unwrap().0);
    }
    write_npy(
        &dir.join("pixels.npy"),
        &[BATCH, 3, SIDE as usize, SIDE as usize],
        &pixels,
    );

    // Tessera's vision tower alone, in both precisions.
    let mut model = clip.model.clone();
    let mut acts = Activations::new(&model, BATCH, 77).unwrap();
    let threads = rayon::current_num_threads();
    let mut tessera = Vec::new();
    let mut embeds = Vec::new();
    for products in [Products::Fp32, Products::Bf16] {
        model.set_products(products);
        let mut times = Vec::new();
        for i in 0..6 {
            let t0 = Instant::now();
            model
                .image_forward(&clip.params, &mut acts, &pixels)
                .unwrap();
            if i > 0 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        let t = median(times);
        println!(
            "tessera image_forward {products}: {:.1} ms per batch of {BATCH}, {:.2} images/s \
             ({threads} threads); first embedding {:?}",
            t * 1e3,
            BATCH as f64 / t,
            &acts.image_embeds[..4]
        );
        tessera.push(t);
        embeds.push(acts.image_embeds.clone());
    }
    let d = dims.projection_dim;
    let worst = (0..BATCH)
        .map(|b| {
            let (x, y) = (
                &embeds[0][b * d..(b + 1) * d],
                &embeds[1][b * d..(b + 1) * d],
            );
            x.iter().zip(y).map(|(a, b)| (a * b) as f64).sum::<f64>()
        })
        .fold(f64::INFINITY, f64::min);
    println!("bf16 against fp32 embeddings: smallest cosine {worst:.6} over {BATCH} images");

    // `data-prep embed` end to end.
    let images_glob = format!("{}/*.tis", shards.display());
    for products in ["fp32", "bf16"] {
        let out = tmp.path().join(format!("emb-{products}"));
        let text = ok(data_prep(&[
            "embed",
            "--model",
            s(&dir),
            "--images",
            &images_glob,
            "--out",
            s(&out),
            "--batch",
            "32",
            "--precision",
            products,
            "--quiet",
        ]));
        println!(
            "data-prep embed --precision {products} (160 records): {}",
            text.trim()
        );
    }

    // PyTorch on the same weights and pixels.
    let python = std::env::var("TORCH_PYTHON").unwrap_or("/tmp/torchvenv/bin/python".into());
    if !Path::new(&python).exists() {
        println!("PyTorch peer skipped: no {python} (set TORCH_PYTHON)");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/bench_clip_pytorch.py");
    let mut torch = Vec::new();
    for bf16 in [false, true] {
        let mut cmd = std::process::Command::new(&python);
        cmd.arg(&script)
            .args(["--model", s(&dir), "--threads", &threads.to_string()]);
        if bf16 {
            cmd.arg("--bf16");
        }
        let o = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout);
        println!("{}", stdout.trim());
        if !o.status.success() {
            println!(
                "PyTorch peer failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            return;
        }
        let v: serde_json::Value =
            serde_json::from_str(stdout.trim().lines().last().unwrap()).unwrap();
        torch.push(v["ms_per_batch_median"].as_f64().unwrap() / 1e3);
    }
    println!(
        "Tessera ÷ PyTorch time per image (target ≤ 0.8): fp32 {:.2}; Tessera bf16 ÷ PyTorch fp32 \
         {:.2}; bf16 ÷ PyTorch bf16 autocast {:.2}",
        tessera[0] / torch[0],
        tessera[1] / torch[0],
        tessera[1] / torch[1]
    );
}

/// Benchmark (ignored): similarities per second of `data-prep dedup`'s exact blocked search (N =
/// 20 000 and 5 000) and the time of its HNSW search (N = 5 000), on random unit vectors of D =
/// 512 (ViT-B/32's size), written as an embeddings folder of the documented format over a shard
/// of 8×8 images.
#[test]
#[ignore = "benchmark: prints the dedup search rates; run with --ignored --nocapture"]
fn bench_dedup_search() {
    if cfg!(debug_assertions) {
        eprintln!(
            "built with debug assertions: the times are not the release build's (use --release)"
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let emb = write_random_embeddings(&tmp.path().join("n20000"), 20_000);
    search(tmp.path(), &emb, "exact", 20_000);
    let emb = write_random_embeddings(&tmp.path().join("n5000"), 5_000);
    search(tmp.path(), &emb, "exact", 5_000);
    search(tmp.path(), &emb, "hnsw", 5_000);
}

const D: usize = 512;

/// `data-prep dedup --index INDEX` on `emb`; prints the report's rates.
fn search(tmp: &Path, emb: &Path, index: &str, n: usize) {
    let out = tmp.join(format!("{index}-{n}"));
    ok(data_prep(&[
        "dedup",
        "--embeddings",
        s(emb),
        "--out",
        s(&out),
        "--index",
        index,
        "--quiet",
    ]));
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    println!(
        "dedup --index {index}, N {n}, D {D}: {} similarities in {:.2} s, {:.3e} similarities/s \
         ({:.1} GFLOP/s at 2D FLOPs each), {:.3e} pairs covered/s; {} pairs ≥ 0.94",
        r["similarities_computed"],
        r["search_seconds"].as_f64().unwrap(),
        r["similarities_per_second"].as_f64().unwrap(),
        r["similarities_per_second"].as_f64().unwrap() * 2.0 * D as f64 / 1e9,
        (n * (n - 1) / 2) as f64 / r["search_seconds"].as_f64().unwrap(),
        r["pairs_at_or_above_threshold"]
    );
}

/// n random unit vectors as an embeddings folder `dir` over a shard of n 8×8 images.
fn write_random_embeddings(dir: &Path, n: usize) -> std::path::PathBuf {
    use rand::Rng;
    std::fs::create_dir_all(dir).unwrap();
    let shard = dir.join("images-00000.tis");
    let mut w = ImageShardWriter::create(&shard, 8, 256, 1).unwrap();
    for i in 0..n {
        w.push(&[(i % 251) as u8; 8 * 8 * 3], "x", None).unwrap();
    }
    w.finish().unwrap();
    let crc = formats::image_shard::ImageShard::open(&shard)
        .unwrap()
        .header()
        .index_crc;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut bytes = Vec::with_capacity(n * D * 2);
    for _ in 0..n {
        let v: Vec<f32> = (0..D).map(|_| rng.random::<f32>() - 0.5).collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        bytes.extend(
            v.iter()
                .flat_map(|x| half::f16::from_f32(x / norm).to_le_bytes()),
        );
    }
    let emb = dir.join("emb");
    std::fs::create_dir_all(&emb).unwrap();
    let meta = std::collections::HashMap::from([("weights_xxh3".to_string(), "0".to_string())]);
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F16, vec![n, D], &bytes).unwrap();
    safetensors::serialize_to_file(
        [("image", view)],
        Some(meta),
        &emb.join("images-00000.safetensors"),
    )
    .unwrap();
    let manifest = json!({
        "format": "tessera-clip-embeddings", "version": 1, "model": "random", "model_kind": "none",
        "weights_xxh3": "0", "dim": D, "image_size": 8, "captions": false, "records": n,
        "shards": [{"name": "images-00000", "source": shard, "records": n, "resolution": 8,
                    "source_index_crc": crc, "file": "images-00000.safetensors"}]
    });
    std::fs::write(emb.join("manifest.json"), manifest.to_string()).unwrap();
    emb
}
