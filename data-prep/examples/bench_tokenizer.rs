//! Captions tokenized per second by the caption BPE (`formats::bpe`).
//!
//!     cargo run --release -p data-prep --example bench_tokenizer [-- N_CAPTIONS VOCAB]
//!
//! Generates N (default 20,000) deterministic captions over 30,000 made-up words, trains
//! a BPE of VOCAB (default 16,384) tokens on them, then times, over all captions after one
//! warm-up pass: `encode` one caption at a time, `encode_batch` (parallel on rayon's pool),
//! Tessera's own merge loop at p = 0 (`encode_with_dropout`), and `encode_caption` with dropout
//! 0.1 into 256 ids as the loader calls it. One JSON line per measurement.

use formats::bpe::{encode_caption, BpeTokenizer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

fn captions(n: usize) -> Vec<String> {
    const LETTERS: &[u8] = b"etaoinshrdlcumwfgypbvkjxqz";
    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    let words: Vec<String> = (0..30_000)
        .map(|_| {
            let k = rng.random_range(2..=10);
            (0..k)
                .map(|_| {
                    // Frequent letters first: r² skews towards the start of LETTERS.
                    let r: f64 = rng.random();
                    LETTERS[((r * r) * LETTERS.len() as f64) as usize] as char
                })
                .collect()
        })
        .collect();
    const COMMON: [&str; 12] = [
        "a",
        "the",
        "of",
        "on",
        "with",
        "and",
        "red",
        "small",
        "photo",
        "in",
        "white",
        "background",
    ];
    (0..n)
        .map(|_| {
            let len = rng.random_range(6..30);
            let mut c = String::new();
            for i in 0..len {
                if i > 0 {
                    c.push(' ');
                }
                // Zipf-like: common words often, the long tail rarely.
                let w = if rng.random_bool(0.4) {
                    COMMON[rng.random_range(0..COMMON.len())]
                } else {
                    let r: f64 = rng.random();
                    &words[((r * r * r) * words.len() as f64) as usize]
                };
                c.push_str(w);
            }
            if rng.random_bool(0.3) {
                c.push_str(", Photographed in 2023!");
            }
            c
        })
        .collect()
}

fn report(what: &str, n: usize, secs: f64, extra: &str) {
    println!(
        "{{\"bench\":\"tokenizer\",\"what\":\"{what}\",\"captions\":{n},\"seconds\":{secs:.4},\"captions_per_s\":{:.0}{extra}}}",
        n as f64 / secs
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args
        .get(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(20_000);
    let vocab: usize = args
        .get(2)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(16_384);
    let caps = captions(n);
    let chars: usize = caps.iter().map(String::len).sum();

    let t = Instant::now();
    let tok = BpeTokenizer::train(caps.clone().into_iter(), vocab, 2)?;
    let train_s = t.elapsed().as_secs_f64();
    report(
        "train",
        n,
        train_s,
        &format!(",\"vocab\":{},\"bytes\":{chars}", tok.vocab_size()),
    );

    let mut tokens = 0usize;
    for c in &caps {
        tokens += tok.encode(c)?.len();
    }
    let t = Instant::now();
    for c in &caps {
        std::hint::black_box(tok.encode(c)?);
    }
    report(
        "encode",
        n,
        t.elapsed().as_secs_f64(),
        &format!(",\"tokens_per_caption\":{:.1}", tokens as f64 / n as f64),
    );

    let refs: Vec<&str> = caps.iter().map(String::as_str).collect();
    tok.encode_batch(&refs)?;
    let t = Instant::now();
    std::hint::black_box(tok.encode_batch(&refs)?);
    report(
        "encode_batch",
        n,
        t.elapsed().as_secs_f64(),
        &format!(",\"threads\":{}", rayon::current_num_threads()),
    );

    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let t = Instant::now();
    for c in &caps {
        std::hint::black_box(tok.encode_with_dropout(c, 0.0, &mut rng)?);
    }
    report("merge_loop_p0", n, t.elapsed().as_secs_f64(), "");

    let t = Instant::now();
    for c in &caps {
        std::hint::black_box(encode_caption(&tok, c, 256, vocab, 0.1, &mut rng)?);
    }
    report(
        "encode_caption_dropout_0.1",
        n,
        t.elapsed().as_secs_f64(),
        ",\"text_len\":256",
    );
    Ok(())
}
