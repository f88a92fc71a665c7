//! `data-prep judge` on real `synth` output: with their own captions the pictures score near
//! 100%, with every caption moved to the next picture near the chance levels the report states;
//! a missing picture and a caption that names no known shape are errors naming the file.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn data_prep(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_data-prep"))
        .args(args)
        .output()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `count` synth samples at 64 px (the quickstart's resolution) in `dir`.
fn synth(dir: &Path, count: u64) {
    let o = data_prep(&[
        "synth",
        "--quiet",
        "--count",
        &count.to_string(),
        "--resolution",
        "64",
        "--seed",
        "3",
        "--out",
        s(dir),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Runs the judge on `dir`; returns the report's rates.
fn judge(dir: &Path) -> Value {
    let out = dir.with_extension("judge.json");
    let o = data_prep(&["judge", "--images", s(dir), "--out", s(&out)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("colour") && stdout.contains("chance"),
        "{stdout}"
    );
    let report: Value = serde_json::from_slice(&fs::read(&out).unwrap()).unwrap();
    report["rates"].clone()
}

fn captions(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir.join("00000"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    v.sort();
    v
}

fn rate(r: &Value, metric: &str, field: &str) -> f64 {
    r[metric][field]
        .as_f64()
        .unwrap_or_else(|| panic!("{metric}.{field} in {r}"))
}

#[test]
fn own_captions_score_near_all_and_rotated_ones_near_chance() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("shapes");
    synth(&dir, 300);
    let own = judge(&dir);
    // Measured on these 300 (seed 3): colour 100%, shape and both 99.3% (298), background 100%,
    // position 97.4% (113 of 116); the bounds leave room for a few more small shapes.
    for (metric, bound) in [
        ("colour", 0.99),
        ("shape", 0.96),
        ("both", 0.96),
        ("background", 0.99),
        ("position", 0.95),
    ] {
        let r = rate(&own, metric, "rate");
        assert!(r >= bound, "{metric}: {r} < {bound}: {own}");
    }
    assert_eq!(own["colour"]["judged"], 300);
    // About 40% of the captions name one shape, and only those have a position.
    let lone = own["position"]["judged"].as_u64().unwrap();
    assert!((80..=160).contains(&lone), "{lone}");
    // Chance: 1 or 2 of 10 colours, 1 of 4 backgrounds, 1 of 9 positions.
    let colour_chance = rate(&own, "colour", "chance");
    assert!((0.1..=0.2).contains(&colour_chance), "{colour_chance}");
    assert!((rate(&own, "background", "chance") - 0.25).abs() < 1e-9);
    assert!((rate(&own, "position", "chance") - 1.0 / 9.0).abs() < 1e-9);

    // Every caption moved to the next picture: the pictures no longer show what they say.
    let files = captions(&dir);
    let texts: Vec<String> = files
        .iter()
        .map(|f| fs::read_to_string(f).unwrap())
        .collect();
    for (i, f) in files.iter().enumerate() {
        fs::write(f, &texts[(i + 1) % texts.len()]).unwrap();
    }
    // Measured: colour 13.3%, shape 20.3%, both 2.0%, background 23.0%, position 10.3%, beside
    // chance 16.1%, 22.0%, 2.3%, 25%, 11.1%.
    let rotated = judge(&dir);
    for metric in ["colour", "shape", "both", "background", "position"] {
        let (r, chance) = (
            rate(&rotated, metric, "rate"),
            rate(&rotated, metric, "chance"),
        );
        // Near chance: within 0.1 of it (300 pictures: a binomial's sd is at most 0.03), and
        // near what the same pictures score against every other caption.
        assert!(
            (r - chance).abs() <= 0.1,
            "{metric}: {r} vs chance {chance}"
        );
        let shuffled = rate(&rotated, metric, "shuffled");
        assert!(
            (r - shuffled).abs() <= 0.1,
            "{metric}: {r} vs shuffled {shuffled}"
        );
    }
    // The shuffled baseline of the true pairs is the same pictures against other captions.
    assert!(rate(&own, "colour", "shuffled") < 0.3, "{own}");
}

#[test]
fn a_missing_picture_or_an_unknown_caption_is_an_error_naming_it() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("shapes");
    synth(&dir, 6);
    let files = captions(&dir);

    fs::write(&files[4], "a photo of a dog").unwrap();
    let o = data_prep(&["judge", "--images", s(&dir)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("000000004.txt") && err.contains("a photo of a dog"),
        "{err}"
    );
    assert!(
        err.contains("names no shape of a known colour and kind"),
        "{err}"
    );

    fs::write(&files[4], "a large red circle on a white background").unwrap();
    fs::remove_file(files[2].with_extension("png")).unwrap();
    let o = data_prep(&["judge", "--images", s(&dir)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("000000002.txt") && err.contains("000000002.png") && err.contains("missing"),
        "{err}"
    );

    // A `trainer sample` folder: index.json names each prompt's grid, then its pictures.
    let samples = d.path().join("samples");
    fs::create_dir(&samples).unwrap();
    let index = serde_json::json!({
        "prompts": ["a small blue cross on a gray background", "no shape here"],
        "files": [["prompt_000.png", "prompt_000_00.png"], ["prompt_001.png", "prompt_001_00.png"]],
    });
    fs::write(samples.join("index.json"), index.to_string()).unwrap();
    let o = data_prep(&["judge", "--images", s(&samples)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("index.json, prompt 0") && err.contains("prompt_000_00.png is missing"),
        "{err}"
    );
    for name in ["prompt_000_00.png", "prompt_001_00.png"] {
        fs::copy(files[0].with_extension("png"), samples.join(name)).unwrap();
    }
    let o = data_prep(&["judge", "--images", s(&samples)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("index.json, prompt 1") && err.contains("no shape here"),
        "{err}"
    );

    // Nothing to judge at all.
    let empty = d.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let o = data_prep(&["judge", "--images", s(&empty)]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("nothing to judge"));
}

#[test]
fn a_sample_folder_pairs_pictures_with_their_prompts() {
    // Pictures laid out as `trainer sample` writes them (index.json's paths relative to where
    // it ran), drawn here by synth: two of a blue cross, two of a red circle.
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("shapes");
    synth(&dir, 40);
    let files = captions(&dir);
    let lone: Vec<(PathBuf, String)> = files
        .iter()
        .map(|f| (f.with_extension("png"), fs::read_to_string(f).unwrap()))
        .filter(|(_, c)| !c.contains(" above ") && !c.contains(" below ") && !c.contains(" of "))
        .take(4)
        .collect();
    assert_eq!(lone.len(), 4);
    let samples = d.path().join("samples");
    fs::create_dir(&samples).unwrap();
    let mut prompts = Vec::new();
    let mut listed = Vec::new();
    for (i, pair) in lone.chunks(2).enumerate() {
        // Each prompt is its first picture's caption; the second picture shows something else.
        prompts.push(pair[0].1.clone());
        let mut these = vec![format!("elsewhere/prompt_{i:03}.png")];
        for (j, (png, _)) in pair.iter().enumerate() {
            let name = format!("prompt_{i:03}_{j:02}.png");
            fs::copy(png, samples.join(&name)).unwrap();
            these.push(format!("elsewhere/{name}"));
        }
        listed.push(these);
    }
    let index = serde_json::json!({ "prompts": prompts, "files": listed });
    fs::write(samples.join("index.json"), index.to_string()).unwrap();
    let r = judge(&samples);
    assert_eq!(r["background"]["judged"], 4);
    let matched = r["both"]["matched"].as_u64().unwrap();
    // The first picture of each prompt matches; the second only if it happens to show the same.
    assert!((2..=4).contains(&matched), "{r}");
    assert_eq!(r["position"]["judged"], 4);
}
