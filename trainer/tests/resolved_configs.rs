//! The resolved form of every shipped config (`configs/*.yaml`: every field, defaults filled in)
//! is held to a copy under `tests/fixtures/resolved/`, so that a refactor of the config code
//! cannot change what a config means without a test saying so. A deliberate change (a new field
//! and its default) rewrites the copies with `TESSERA_BLESS=1 cargo test -p trainer --test
//! resolved_configs`, and the diff shows it.

use std::path::Path;
use trainer::config::RunConfig;

#[test]
fn every_shipped_config_resolves_as_recorded() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let configs = root.join("../configs");
    let fixtures = root.join("tests/fixtures/resolved");
    let bless = std::env::var("TESSERA_BLESS").as_deref() == Ok("1");
    let mut names: Vec<String> = std::fs::read_dir(&configs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    names.sort();
    assert!(names.len() >= 4, "configs/ holds {names:?}");
    for name in &names {
        let cfg = RunConfig::load(&configs.join(name), &[]).unwrap();
        let got = cfg.to_yaml();
        let want_path = fixtures.join(name);
        if bless {
            std::fs::create_dir_all(&fixtures).unwrap();
            std::fs::write(&want_path, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&want_path)
            .unwrap_or_else(|e| panic!("{}: {e} (TESSERA_BLESS=1 writes it)", want_path.display()));
        assert_eq!(
            got,
            want,
            "configs/{name} resolves differently from {}",
            want_path.display()
        );
    }
    // No recorded copy of a config that is gone.
    let recorded = std::fs::read_dir(&fixtures).unwrap().count();
    assert_eq!(
        recorded,
        names.len(),
        "stale copies in {}",
        fixtures.display()
    );
}
