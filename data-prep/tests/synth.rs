//! `data-prep synth`: same seed → identical files; captions agree with the drawn positions.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;

fn synth(out: &Path, seed: u64, count: u64) {
    let st = Command::new(env!("CARGO_BIN_EXE_data-prep"))
        .args([
            "synth",
            "--quiet",
            "--count",
            &count.to_string(),
            "--resolution",
            "32",
        ])
        .args(["--seed", &seed.to_string(), "--out"])
        .arg(out)
        .status()
        .unwrap();
    assert!(st.success());
}

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.insert(rel, fs::read(&p).unwrap());
            }
        }
    }
    out
}

#[test]
fn same_seed_same_bytes() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    synth(a.path(), 5, 30);
    synth(b.path(), 5, 30);
    synth(c.path(), 6, 30);
    let (fa, fb, fc) = (files(a.path()), files(b.path()), files(c.path()));
    // 30 × (png, txt, json) + synth.json
    assert_eq!(fa.len(), 91);
    assert!(fa.contains_key("00000/000000029.png"));
    assert_eq!(fa, fb);
    assert_ne!(fa["00000/000000003.png"], fc["00000/000000003.png"]);
}

#[test]
fn captions_match_positions_and_json() {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path(), 11, 40);
    let mut pairs = 0;
    for i in 0..40 {
        let stem = dir.path().join(format!("00000/{i:09}"));
        let caption = fs::read_to_string(stem.with_extension("txt")).unwrap();
        let j: serde_json::Value =
            serde_json::from_slice(&fs::read(stem.with_extension("json")).unwrap()).unwrap();
        assert_eq!(j["caption"], caption.as_str());
        assert_eq!(j["status"], "success");
        assert_eq!(
            (j["width"].as_u64(), j["height"].as_u64()),
            (Some(32), Some(32))
        );
        assert_eq!(j["key"], format!("{i:09}"));
        let shapes = j["shapes"].as_array().unwrap();
        let desc = |s: &serde_json::Value| {
            format!(
                "a {} {} {}",
                s["size"].as_str().unwrap(),
                s["colour"].as_str().unwrap(),
                s["kind"].as_str().unwrap()
            )
        };
        assert!(caption.starts_with(&desc(&shapes[0])), "{caption}");
        assert!(caption.ends_with(&format!(
            "on a {} background",
            j["background"].as_str().unwrap()
        )));
        if shapes.len() == 2 {
            pairs += 1;
            let f = |s: &serde_json::Value, k: &str| s[k].as_f64().unwrap();
            let (dx, dy) = (
                f(&shapes[0], "cx") - f(&shapes[1], "cx"),
                f(&shapes[0], "cy") - f(&shapes[1], "cy"),
            );
            let rel = if dy.abs() >= dx.abs() {
                if dy < 0.0 {
                    "above"
                } else {
                    "below"
                }
            } else if dx < 0.0 {
                "to the left of"
            } else {
                "to the right of"
            };
            assert!(
                caption.contains(&format!(" {rel} {}", desc(&shapes[1]))),
                "{caption} vs dx {dx} dy {dy}"
            );
            // The shapes are apart along the relation's axis.
            let gap = dx.abs().max(dy.abs());
            assert!(
                gap >= f(&shapes[0], "radius") + f(&shapes[1], "radius"),
                "{caption}"
            );
        }
    }
    assert!(pairs >= 5, "only {pairs} two-shape samples in 40");
}
