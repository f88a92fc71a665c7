//! README's main command, `scripts/quickstart.sh`, end to end at toy sizes with the binaries of
//! this build (`QS_SKIP_BUILD=1`): every step runs and leaves its marker and output, the judge
//! reports on the held-out pictures, the dVAE's reconstructions of them and the samples; a rerun
//! skips every step and prints the judge's rates again; a step whose output is removed runs
//! again with the steps after it; another size in the same work directory is refused.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod support;
use support::text;

/// The folder of this build's binaries (`data-prep`'s, where `cargo test --workspace` also puts
/// `trainer`).
fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_data-prep"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn quickstart(work: &Path, sizes: &[(&str, &str)]) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/quickstart.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(script)
        .arg(work)
        .env("QS_SKIP_BUILD", "1")
        .env("QS_BIN", bin_dir());
    for (k, v) in sizes {
        cmd.env(k, v);
    }
    cmd.output().expect("running scripts/quickstart.sh")
}

fn report(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap()
}

const STEPS: [&str; 10] = [
    "build",
    "synth",
    "heldout",
    "ingest",
    "tokenizer",
    "dvae",
    "encode",
    "transformer",
    "sample",
    "judge",
];

#[test]
fn the_quickstart_runs_every_step_resumes_and_refuses_another_size() {
    if !bin_dir().join("trainer").is_file() {
        eprintln!(
            "skipped: no trainer binary beside {} (the README's test command, `cargo test \
             --workspace`, builds it; or `cargo build -p trainer`)",
            env!("CARGO_BIN_EXE_data-prep")
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("qs");
    let sizes = [
        ("QS_TRAIN_COUNT", "64"),
        ("QS_HELDOUT", "2"),
        ("QS_PER_CAPTION", "2"),
        ("QS_DVAE_STEPS", "3"),
        ("QS_TRANSFORMER_STEPS", "3"),
    ];
    let first = quickstart(&work, &sizes);
    let out = text(&first);
    assert!(first.status.success(), "{out}");
    for step in STEPS {
        assert!(
            work.join(format!("steps/{step}.done")).is_file(),
            "no marker for {step}: {out}"
        );
        if step != "build" {
            assert!(out.contains(&format!("[{step}] done in")), "{step}: {out}");
        }
    }
    assert!(out.contains("pictures for the held-out captions"), "{out}");
    // The judge's three reports: 8 held-out pictures (4 per caption asked for), their
    // reconstructions, and 2 captions × 2 samples.
    let heldout = report(&work.join("judge-heldout.json"));
    let recon = report(&work.join("judge-reconstructions.json"));
    let samples = report(&work.join("judge.json"));
    assert_eq!(heldout["pictures"], 8);
    assert_eq!(recon["pictures"], 8);
    assert_eq!(samples["pictures"], 4);
    assert_eq!(samples["captions"], 2);
    // The synth pictures are what the judge reads best.
    assert!(heldout["rates"]["colour"]["rate"].as_f64().unwrap() > 0.8);
    assert!(work.join("reconstructions.png").is_file());
    let index = report(&work.join("samples/index.json"));
    assert_eq!(index["prompts"].as_array().unwrap().len(), 2);
    let dvae_final = work.join("dvae/checkpoints/step_00000003/DONE");
    let transformer_final = work.join("transformer/checkpoints/step_00000003/DONE");
    assert!(dvae_final.is_file() && transformer_final.is_file());

    // A rerun: nothing runs again, and the samples' rates are printed again.
    let again = quickstart(&work, &sizes);
    let out = text(&again);
    assert!(again.status.success(), "{out}");
    for step in &STEPS[1..] {
        assert!(
            out.contains(&format!("[{step}] done earlier, skipped")),
            "{step}: {out}"
        );
    }
    assert!(out.contains("the judge's rates on the samples"), "{out}");

    // The samples removed: sampling runs again, and so does the judge after it; nothing before.
    std::fs::remove_file(work.join("samples/index.json")).unwrap();
    let redo = quickstart(&work, &sizes);
    let out = text(&redo);
    assert!(redo.status.success(), "{out}");
    assert!(out.contains("[transformer] done earlier, skipped"), "{out}");
    assert!(
        out.contains("[sample] done in") && out.contains("[judge] done in"),
        "{out}"
    );

    // Another size in the same work directory would mix two data sets: refused.
    let mut other = sizes;
    other[0] = ("QS_TRAIN_COUNT", "128");
    let refused = quickstart(&work, &other);
    let out = text(&refused);
    assert!(!refused.status.success(), "{out}");
    assert!(
        out.contains("was started with sizes") && out.contains("train_count=64"),
        "{out}"
    );
}
