use super::*;

const FULL: &str = "\
run:
  name: t
  out_dir: runs/t
  seed: 7
  device: cpu
model:
  text_len: 8
  text_vocab: 64
  grid: 4
  image_vocab: 32
  d_model: 32
  heads: 4
  layers: 2
  conv_kernel: 3
data:
  source: synthetic
  min_caption_tokens: 2
  max_caption_tokens: 6
optim:
  lr: 1.0e-3
  beta1: 0.9
  beta2: 0.95
  eps: 1.0e-8
  weight_decay: 0.01
  grad_clip: 1.0
  ema: 0.0
schedule:
  kind: cosine
  warmup_steps: 5
  plateau_patience: 10
  plateau_window: 5
  plateau_factor: 0.5
  min_lr: 1.0e-5
  total_steps: 40
train:
  steps: 20
  batch_size: 2
  grad_accum: 2
  log_every: 1
checkpoint:
  every: 10
  keep_last: 2
";

/// Only the required fields.
const MINIMAL: &str = "\
run:
  name: m
  out_dir: runs/m
model:
  text_len: 8
  text_vocab: 64
  grid: 4
  image_vocab: 32
  d_model: 32
  heads: 4
  layers: 2
data:
  source: synthetic
train:
  steps: 20
  batch_size: 2
";

fn sets(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn load_err(text: &str, overrides: &[&str]) -> String {
    match RunConfig::from_yaml_str_with_overrides(text, "test.yaml", &sets(overrides)) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn full_config_round_trips_through_to_yaml() {
    let c = RunConfig::from_yaml_str(FULL, "full.yaml").unwrap();
    assert_eq!(c.run.device, Device::Cpu);
    assert_eq!(c.schedule.kind, ScheduleKind::Cosine);
    assert_eq!(c.transformer().unwrap().conv_kernel, 3);
    assert_eq!(
        c.data,
        DataSource::Synthetic(SyntheticConfig {
            min_caption_tokens: 2,
            max_caption_tokens: Some(6)
        })
    );
    let back = RunConfig::from_yaml_str(&c.to_yaml(), "resolved.yaml").unwrap();
    assert_eq!(back, c);
    assert_eq!(back.to_yaml(), c.to_yaml());
    assert_eq!(back.hash(), c.hash());
    assert_eq!(c.hash().len(), 64);
    let mut other = c.clone();
    other.optim.lr = 2e-3;
    assert_ne!(other.hash(), c.hash());
}

#[test]
fn defaults_fill_in() {
    let c = RunConfig::from_yaml_str(MINIMAL, "minimal.yaml").unwrap();
    assert_eq!(c.run.seed, 0);
    assert_eq!(c.run.device, Device::Auto);
    assert_eq!(c.transformer().unwrap().conv_kernel, 11);
    assert_eq!(c.data, DataSource::Synthetic(SyntheticConfig::default()));
    let DataSource::Synthetic(s) = &c.data else {
        panic!("synthetic expected")
    };
    assert_eq!(s.min_caption_tokens, 4);
    assert_eq!(s.max_caption_tokens(c.transformer().unwrap().text_len), 8);
    assert_eq!(c.optim, OptimConfig::default());
    assert_eq!(c.optim.lr, 4.5e-4);
    assert_eq!(c.optim.beta2, 0.96);
    assert_eq!(c.optim.weight_decay, 4.5e-2);
    assert_eq!(c.schedule, ScheduleConfig::default());
    assert_eq!(c.schedule_total_steps(), 20);
    assert_eq!(c.train.grad_accum, 1);
    assert_eq!(c.train.log_every, 10);
    assert_eq!(c.checkpoint, CheckpointConfig::default());
    assert_eq!(c.transformer().unwrap().seq_len(), 8 + 16);
    assert_eq!(c.transformer().unwrap().head_size(), 8);
}

#[test]
fn unknown_field_is_named_with_file_and_line() {
    let text = FULL.replace("  grad_clip: 1.0", "  grad_clip: 1.0\n  lrr: 1.0");
    let e = load_err(&text, &[]);
    assert!(e.starts_with("test.yaml: "), "{e}");
    assert!(
        e.contains("optim") && e.contains("unknown field `lrr`"),
        "{e}"
    );
    assert!(e.contains("line"), "{e}");
    let e = load_err(&format!("{FULL}extra:\n  a: 1\n"), &[]);
    assert!(e.contains("unknown field `extra`"), "{e}");
}

#[test]
fn missing_field_is_named() {
    let e = load_err(&MINIMAL.replace("  heads: 4\n", ""), &[]);
    assert!(e.starts_with("test.yaml: "), "{e}");
    assert!(
        e.contains("model") && e.contains("missing field `heads`"),
        "{e}"
    );
    let e = load_err(&MINIMAL.replace("  steps: 20\n", ""), &[]);
    assert!(e.contains("missing field `steps`"), "{e}");
}

#[test]
fn wrong_type_keeps_path_and_line() {
    let e = load_err(&FULL.replace("lr: 1.0e-3", "lr: fast"), &[]);
    assert!(e.starts_with("test.yaml: optim.lr: "), "{e}");
    assert!(e.contains("invalid type") && e.contains("line 20"), "{e}");
}

#[test]
fn bad_enum_value_is_named() {
    let e = load_err(&FULL.replace("device: cpu", "device: tpu"), &[]);
    assert!(e.contains("run.device") && e.contains("tpu"), "{e}");
    let e = load_err(&FULL.replace("kind: cosine", "kind: linear"), &[]);
    assert!(e.contains("schedule.kind") && e.contains("linear"), "{e}");
    let e = load_err(
        &FULL.replace("source: synthetic", "source: webdataset"),
        &[],
    );
    assert!(e.contains("data.source") && e.contains("webdataset"), "{e}");
}

#[test]
fn out_of_range_values_are_named() {
    for (from, to, expected) in [
        (
            "d_model: 32",
            "d_model: 30",
            "model.d_model = 30 must be divisible by model.heads = 4",
        ),
        (
            "beta2: 0.95",
            "beta2: 1.5",
            "optim.beta2 = 1.5 must be in [0, 1)",
        ),
        (
            "conv_kernel: 3",
            "conv_kernel: 4",
            "model.conv_kernel = 4 must be odd and ≥ 1",
        ),
        (
            "keep_last: 2",
            "keep_last: 0",
            "checkpoint.keep_last must be ≥ 1",
        ),
        (
            "batch_size: 2",
            "batch_size: 0",
            "train.batch_size must be ≥ 1",
        ),
        ("lr: 1.0e-3", "lr: 0.0", "optim.lr = 0 must be > 0"),
        ("ema: 0.0", "ema: 1.0", "optim.ema = 1 must be in [0, 1)"),
        (
            "text_vocab: 64",
            "text_vocab: 1",
            "model.text_vocab = 1 must be ≥ 2",
        ),
        (
            "max_caption_tokens: 6",
            "max_caption_tokens: 9",
            "data.max_caption_tokens = 9 must be ≤ model.text_len = 8",
        ),
        (
            "plateau_factor: 0.5",
            "plateau_factor: 1.0",
            "schedule.plateau_factor = 1 must be in (0, 1)",
        ),
    ] {
        assert!(FULL.contains(from), "{from}");
        let e = load_err(&FULL.replace(from, to), &[]);
        assert_eq!(e, format!("test.yaml: {expected}"));
    }
}

#[test]
fn the_config_accepts_exactly_the_transformer_sizes_the_model_builds() {
    // One check for both (TransformerDims::check): a one-token caption leaves the text loss
    // nothing to score, and the config said so too late (the model refused it at start-up).
    let e = load_err(&FULL.replace("text_len: 8", "text_len: 1"), &[]);
    assert_eq!(e, "test.yaml: model.text_len = 1 must be ≥ 2");
    let two = FULL
        .replace("text_len: 8", "text_len: 2")
        .replace("max_caption_tokens: 6", "max_caption_tokens: 2");
    let c = RunConfig::from_yaml_str(&two, "t").unwrap();
    crate::model::transformer::Transformer::new(*c.transformer().unwrap()).unwrap();
}

#[test]
fn invalid_error_carries_the_field() {
    let err =
        RunConfig::from_yaml_str(&FULL.replace("heads: 4", "heads: 5"), "f.yaml").unwrap_err();
    match err {
        ConfigError::Invalid { field, .. } => assert_eq!(field, "model.d_model"),
        other => panic!("wrong error {other:?}"),
    }
}

#[test]
fn overrides_apply_with_yaml_scalar_types() {
    let c = RunConfig::from_yaml_str_with_overrides(
        FULL,
        "full.yaml",
        &sets(&[
            "optim.lr=1e-3",
            "optim.lr=2.5e-3",
            "run.device=auto",
            "run.name=1234",
            "train.steps=99",
            "schedule.total_steps=null",
            "data.max_caption_tokens=7",
        ]),
    )
    .unwrap();
    assert_eq!(c.optim.lr, 2.5e-3);
    assert_eq!(c.run.device, Device::Auto);
    assert_eq!(c.run.name, "1234");
    assert_eq!(c.train.steps, 99);
    assert_eq!(c.schedule.total_steps, None);
    let DataSource::Synthetic(s) = &c.data else {
        panic!("synthetic expected")
    };
    assert_eq!(s.max_caption_tokens, Some(7));
}

#[test]
fn override_of_field_absent_from_file_uses_the_struct() {
    let c = RunConfig::from_yaml_str_with_overrides(
        MINIMAL,
        "minimal.yaml",
        &sets(&[
            "model.conv_kernel=5",
            "checkpoint.keep_last=7",
            "optim.ema=0",
        ]),
    )
    .unwrap();
    assert_eq!(c.transformer().unwrap().conv_kernel, 5);
    assert_eq!(c.checkpoint.keep_last, 7);
    assert_eq!(c.checkpoint.every, 1000);
    assert_eq!(c.optim.ema, 0.0);
    // An override can also supply a required field the file lacks.
    let c = RunConfig::from_yaml_str_with_overrides(
        &MINIMAL.replace("  layers: 2\n", ""),
        "minimal.yaml",
        &sets(&["model.layers=3"]),
    )
    .unwrap();
    assert_eq!(c.transformer().unwrap().layers, 3);
}

#[test]
fn unknown_override_path_is_named() {
    let e = load_err(FULL, &["optim.lrr=1"]);
    assert!(
        e.starts_with("--set optim.lrr=1: unknown field 'lrr' in section 'optim'"),
        "{e}"
    );
    let e = load_err(FULL, &["optimizer.lr=1"]);
    assert!(e.contains("unknown section 'optimizer'"), "{e}");
    let e = load_err(FULL, &["optim=1"]);
    assert!(e.contains("'optim' is a section"), "{e}");
    let e = load_err(FULL, &["optim.lr.x=1"]);
    assert!(e.contains("'optim.lr' has no sub-fields"), "{e}");
    let e = load_err("run: 3\n", &["run.name=x"]);
    assert!(e.contains("'run' is not a section"), "{e}");
    let e = load_err(FULL, &["optim.lr"]);
    assert!(e.contains("expected KEY=VALUE"), "{e}");
    let e = load_err(FULL, &["data.colour=1"]);
    assert!(
        e.contains("unknown field 'colour' in section 'data'"),
        "{e}"
    );
    let text = FULL.replace(
        "  min_caption_tokens: 2",
        "  min_caption_tokens: 2\n  colour: 1",
    );
    let e = load_err(&text, &[]);
    assert!(
        e.contains("data: unknown field `colour`") && e.contains("line"),
        "{e}"
    );
}

#[test]
fn override_type_mismatch_is_blamed_on_the_override() {
    let e = load_err(FULL, &["train.steps=10", "optim.lr=fast"]);
    assert!(
        e.starts_with("--set optim.lr=fast: optim.lr: invalid type"),
        "{e}"
    );
    assert!(!e.contains("line"), "{e}");
    let e = load_err(FULL, &["run.device=tpu"]);
    assert!(
        e.starts_with("--set run.device=tpu: run.device: unknown variant"),
        "{e}"
    );
    let e = load_err(FULL, &["data.min_caption_tokens=abc"]);
    assert!(
        e.starts_with("--set data.min_caption_tokens=abc: data.min_caption_tokens: invalid type"),
        "{e}"
    );
    // Range errors after overrides are still validation errors naming the field.
    let e = load_err(FULL, &["optim.beta1=1.0"]);
    assert_eq!(e, "test.yaml: optim.beta1 = 1 must be in [0, 1)");
}

#[test]
fn file_errors_keep_their_line_when_overrides_are_given() {
    let text = FULL.replace("beta1: 0.9", "beta1: high");
    let e = load_err(&text, &["train.steps=3"]);
    assert!(e.starts_with("test.yaml: optim.beta1: invalid type"), "{e}");
    assert!(e.contains("line 21"), "{e}");
}

#[test]
fn load_reads_files_and_names_missing_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, FULL).unwrap();
    let c = RunConfig::load(&path, &sets(&["train.steps=5"])).unwrap();
    assert_eq!(c.train.steps, 5);
    let missing = dir.path().join("nope.yaml");
    let e = RunConfig::load(&missing, &[]).unwrap_err().to_string();
    assert!(e.contains("nope.yaml"), "{e}");
    std::fs::write(&path, FULL.replace("d_model: 32", "d_model: 30")).unwrap();
    let e = RunConfig::load(&path, &[]).unwrap_err().to_string();
    assert!(e.starts_with(&path.display().to_string()), "{e}");
}

#[test]
fn shards_source_parses_round_trips_and_is_validated() {
    let shards = "data:\n  source: shards\n  paths: [data/tokens-*.tts, extra.tts]\n";
    let text = MINIMAL.replace("data:\n  source: synthetic\n", shards);
    let c = RunConfig::from_yaml_str(&text, "s.yaml").unwrap();
    let DataSource::Shards(s) = &c.data else {
        panic!("shards expected")
    };
    assert_eq!(s.paths, vec!["data/tokens-*.tts", "extra.tts"]);
    assert_eq!(
        (s.prefetch, s.bpe_dropout, s.tokenizer.clone()),
        (2, 0.0, None)
    );
    assert_eq!(c.data.kind(), DataSourceKind::Shards);
    let back = RunConfig::from_yaml_str(&c.to_yaml(), "resolved").unwrap();
    assert_eq!(back, c);
    for (overrides, expected) in [
        (
            &["data.bpe_dropout=0.1"][..],
            "data.tokenizer (a tokenizer.json) is required when data.bpe_dropout = 0.1 > 0",
        ),
        (
            &["data.bpe_dropout=1.0"][..],
            "data.bpe_dropout = 1 must be in [0, 1)",
        ),
        (&["data.prefetch=0"][..], "data.prefetch must be ≥ 1"),
        (
            &["data.paths=[]"][..],
            "data.paths must list at least one shard file or glob pattern, none empty",
        ),
    ] {
        let e = load_err(&text, overrides);
        assert_eq!(e, format!("test.yaml: {expected}"));
    }
    let c = RunConfig::from_yaml_str_with_overrides(
        &text,
        "s.yaml",
        &sets(&["data.bpe_dropout=0.1", "data.tokenizer=tok/tokenizer.json"]),
    )
    .unwrap();
    let DataSource::Shards(s) = &c.data else {
        panic!("shards expected")
    };
    assert_eq!(
        s.tokenizer.as_deref(),
        Some(Path::new("tok/tokenizer.json"))
    );
    // Fields of the other source, or none of the required ones, are refused by name.
    let e = load_err(&text, &["data.min_caption_tokens=3"]);
    assert!(
        e.contains("data.min_caption_tokens does not apply to data.source: shards"),
        "{e}"
    );
    let e = load_err(
        &FULL.replace("  min_caption_tokens: 2", "  paths: [x.tts]"),
        &[],
    );
    assert!(
        e.contains("data.paths does not apply to data.source: synthetic"),
        "{e}"
    );
    let e = load_err(&MINIMAL.replace("source: synthetic", "source: shards"), &[]);
    assert!(
        e.contains("data.paths is required for data.source: shards"),
        "{e}"
    );
}

#[test]
fn every_shipped_config_loads_and_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let c = RunConfig::load(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
        let back = RunConfig::from_yaml_str(&c.to_yaml(), "resolved").unwrap();
        assert_eq!(back, c, "{}", path.display());
        count += 1;
    }
    assert!(
        count >= 3,
        "expected the three shipped configs in {}",
        dir.display()
    );
}

const DVAE: &str = "\
run:
  name: d
  out_dir: runs/d
model:
  kind: dvae
  resolution: 64
  n_hid: 16
  vocab_size: 128
data:
  source: images
  paths: [\"img/*.tis\"]
train:
  steps: 20
  batch_size: 2
";

#[test]
fn dvae_model_kind_parses_defaults_and_round_trips() {
    let c = RunConfig::from_yaml_str(DVAE, "dvae.yaml").unwrap();
    assert_eq!(c.model.kind(), ModelKind::Dvae);
    let d = c.model.dvae().unwrap();
    assert_eq!((d.resolution, d.n_hid, d.vocab_size), (64, 16, 128));
    assert_eq!((d.n_blk_per_group, d.n_init), (2, 128));
    assert_eq!(c.relaxation(), RelaxationConfig::default());
    assert!(c.transformer().is_err());
    let back = RunConfig::from_yaml_str(&c.to_yaml(), "resolved.yaml").unwrap();
    assert_eq!(back, c);
    assert!(c.to_yaml().contains("kind: dvae"), "{}", c.to_yaml());
    // A transformer config without `kind` is still a transformer (configs written before
    // the switch load unchanged).
    let t = RunConfig::from_yaml_str(MINIMAL, "t.yaml").unwrap();
    assert_eq!(t.model.kind(), ModelKind::Transformer);
    let over = RunConfig::from_yaml_str_with_overrides(
        DVAE,
        "dvae.yaml",
        &sets(&["model.n_hid=8", "relaxation.tau_steps=100"]),
    )
    .unwrap();
    assert_eq!(over.model.dvae().unwrap().n_hid, 8);
    assert_eq!(over.relaxation().tau_steps, 100);
    assert_eq!(c.relaxation().likelihood, Likelihood::LogitLaplace);
    let g = RunConfig::from_yaml_str_with_overrides(
        DVAE,
        "dvae.yaml",
        &sets(&["relaxation.likelihood=logit-gaussian"]),
    )
    .unwrap();
    assert_eq!(g.relaxation().likelihood, Likelihood::LogitGaussian);
    let e = load_err(DVAE, &["relaxation.likelihood=gauss"]);
    assert!(
        e.starts_with("--set relaxation.likelihood=gauss: relaxation.likelihood: unknown variant"),
        "{e}"
    );
    // branch_gain: OpenAI's unless set, written only when set (the resolved files of configs
    // that do not name it stay as they were).
    assert_eq!(c.relaxation().branch_gain, BranchGain::Openai);
    assert!(!c.to_yaml().contains("branch_gain"), "{}", c.to_yaml());
    let u = RunConfig::from_yaml_str_with_overrides(
        DVAE,
        "dvae.yaml",
        &sets(&["relaxation.branch_gain=unit"]),
    )
    .unwrap();
    assert_eq!(u.relaxation().branch_gain, BranchGain::Unit);
    assert!(u.to_yaml().contains("branch_gain: unit"), "{}", u.to_yaml());
    assert_eq!(
        RunConfig::from_yaml_str(&u.to_yaml(), "resolved.yaml").unwrap(),
        u
    );
    // kl and decoder_input_gain: the same pattern; kl: batch has no device step yet.
    assert_eq!(c.relaxation().kl, KlTerm::Position);
    assert_eq!(c.relaxation().decoder_input_gain, 1.0);
    let k = RunConfig::from_yaml_str_with_overrides(
        DVAE,
        "dvae.yaml",
        &sets(&["relaxation.kl=batch", "relaxation.decoder_input_gain=22.6"]),
    )
    .unwrap();
    assert_eq!(k.relaxation().kl, KlTerm::Batch);
    assert_eq!(k.relaxation().decoder_input_gain, 22.6);
    let text = k.to_yaml();
    assert!(
        text.contains("kl: batch") && text.contains("decoder_input_gain: 22.6"),
        "{text}"
    );
    // The batch KL has its CUDA kernels: the device runs it as the CPU does.
    let emu = RunConfig::from_yaml_str_with_overrides(
        DVAE,
        "dvae.yaml",
        &sets(&["relaxation.kl=batch", "run.device=cuda-emu"]),
    )
    .unwrap();
    assert_eq!(emu.relaxation().kl, KlTerm::Batch);
    let e = load_err(DVAE, &["relaxation.decoder_input_gain=0"]);
    assert!(
        e.contains("relaxation.decoder_input_gain = 0 must be > 0"),
        "{e}"
    );
    let e = load_err(DVAE, &["relaxation.branch_gain=one"]);
    assert!(
        e.starts_with("--set relaxation.branch_gain=one: relaxation.branch_gain: unknown variant"),
        "{e}"
    );
}

#[test]
fn the_model_section_names_exactly_the_fields_of_the_three_models() {
    // `model:` as written (and so `--set model.…`) knows the fields of the models' own structs:
    // a field added to one of them and not to the section would be refused in every file.
    let mut expected = vec!["kind"];
    for kind in [ModelKind::Transformer, ModelKind::Dvae, ModelKind::Clip] {
        let fields = match kind {
            ModelKind::Transformer => fields_of::<TransformerDims>(),
            ModelKind::Dvae => fields_of::<DvaeDims>(),
            ModelKind::Clip => fields_of::<ClipDims>(),
        };
        expected.extend(fields.unwrap());
    }
    assert_eq!(fields_of::<ModelConfig>().unwrap(), expected);
    // The first field of another kind is the one named, in the section's order.
    let e = load_err(MINIMAL, &["model.kind=dvae"]);
    assert!(
        e.contains("model.text_len does not apply to model.kind: dvae"),
        "{e}"
    );
}

#[test]
fn the_config_accepts_exactly_the_dvae_sizes_the_model_builds() {
    // One check for both (DvaeDims::check): an n_hid that is no multiple of 4 passed the
    // config's own check and was refused by the model at start-up.
    let e = load_err(DVAE, &["model.n_hid=6"]);
    assert_eq!(
        e,
        "test.yaml: model.n_hid = 6 must be a multiple of 4 (the residual blocks' inner \
         convolutions are n_out / 4 wide)"
    );
    let c = RunConfig::from_yaml_str_with_overrides(DVAE, "t", &sets(&["model.n_hid=4"])).unwrap();
    crate::model::dvae::Dvae::new(*c.dvae().unwrap()).unwrap();
    // The model names the same fields, without the section.
    let mut bad = *c.dvae().unwrap();
    bad.n_init = 0;
    let e = crate::model::dvae::Dvae::new(bad).unwrap_err().to_string();
    assert_eq!(e, "invalid model sizes: n_init = 0 must be ≥ 1");
    assert!(c.transformer().is_err());
    let t = RunConfig::from_yaml_str(MINIMAL, "t").unwrap();
    assert!(t
        .dvae()
        .unwrap_err()
        .to_string()
        .contains("model.kind is transformer"));
}

#[test]
fn a_decoder_run_needs_no_kl_term_the_host_and_init_for_its_ema() {
    let argmax = [
        "relaxation.decoder_input=argmax",
        "relaxation.beta_end=0",
        "optim.weight_decay=0",
    ];
    let c = RunConfig::from_yaml_str_with_overrides(
        DVAE,
        "dvae.yaml",
        &sets(
            &[
                &argmax[..],
                &["train.init=runs/first", "train.init_ema=true"],
            ]
            .concat(),
        ),
    )
    .unwrap();
    assert_eq!(c.relaxation().decoder_input, DecoderInput::Argmax);
    assert_eq!(c.train.init.as_deref(), Some(Path::new("runs/first")));
    let text = c.to_yaml();
    assert!(
        text.contains("decoder_input: argmax") && text.contains("init_ema: true"),
        "{text}"
    );
    assert_eq!(RunConfig::from_yaml_str(&text, "resolved.yaml").unwrap(), c);
    // The defaults are not written.
    let plain = RunConfig::from_yaml_str(DVAE, "dvae.yaml")
        .unwrap()
        .to_yaml();
    assert!(
        !plain.contains("decoder_input:") && !plain.contains("\n  init"),
        "{plain}"
    );
    let e = load_err(DVAE, &["relaxation.decoder_input=argmax"]);
    assert!(e.contains("relaxation.beta_end (6.6) must be 0"), "{e}");
    let e = load_err(
        DVAE,
        &[&argmax[..], &["relaxation.beta_start=0.5"]].concat(),
    );
    assert!(e.contains("relaxation.beta_start (0.5) and"), "{e}");
    // Weight decay would shrink the encoder that no gradient moves.
    let e = load_err(DVAE, &[&argmax[..2], &["optim.weight_decay=1e-4"]].concat());
    assert!(
        e.contains("optim.weight_decay = 0.0001 would") && e.contains("set it to 0"),
        "{e}"
    );
    let e = load_err(DVAE, &[&argmax[..], &["run.device=cuda-emu"]].concat());
    assert!(
        e.contains("relaxation.decoder_input") && e.contains("run.device is cuda-emu"),
        "{e}"
    );
    let e = load_err(DVAE, &["train.init_ema=true"]);
    assert!(
        e.contains("train.init_ema") && e.contains("needs train.init"),
        "{e}"
    );
}

#[test]
fn dvae_config_errors_name_the_field() {
    let e = load_err(&DVAE.replace("  n_hid: 16\n", ""), &[]);
    assert!(
        e.contains("missing field `n_hid`") && e.contains("dvae"),
        "{e}"
    );
    let e = load_err(
        &DVAE.replace("  n_hid: 16\n", "  n_hid: 16\n  heads: 4\n"),
        &[],
    );
    assert!(
        e.contains("model.heads does not apply to model.kind: dvae"),
        "{e}"
    );
    let e = load_err(
        &MINIMAL.replace("  layers: 2\n", "  layers: 2\n  n_hid: 4\n"),
        &[],
    );
    assert!(
        e.contains("model.n_hid does not apply to model.kind: transformer"),
        "{e}"
    );
    let e = load_err(DVAE, &["model.resolution=60"]);
    assert!(
        e.contains("model.resolution = 60 must be a positive multiple of 8"),
        "{e}"
    );
    let e = load_err(DVAE, &["model.vocab_size=1"]);
    assert!(e.contains("model.vocab_size = 1 must be ≥ 2"), "{e}");
    let e = load_err(DVAE, &["relaxation.tau_end=0"]);
    assert!(e.contains("relaxation.tau_end = 0 must be > 0"), "{e}");
    let e = load_err(DVAE, &["relaxation.beta_steps=0"]);
    assert!(e.contains("relaxation.beta_steps must be ≥ 1"), "{e}");
    let e = load_err(DVAE, &["relaxation.tau_stpes=3"]);
    assert!(e.contains("unknown field 'tau_stpes'"), "{e}");
    // Each model reads its own data.
    let e = load_err(
        &DVAE.replace(
            "  source: images\n  paths: [\"img/*.tis\"]\n",
            "  source: synthetic\n",
        ),
        &[],
    );
    assert!(
        e.contains("data.source must be images, not synthetic"),
        "{e}"
    );
    let e = load_err(
        &MINIMAL.replace(
            "  source: synthetic\n",
            "  source: images\n  paths: [a.tis]\n",
        ),
        &[],
    );
    assert!(
        e.contains("data.source: images feeds model.kind: dvae"),
        "{e}"
    );
    let e = load_err(&format!("{MINIMAL}relaxation:\n  tau_steps: 5\n"), &[]);
    assert!(
        e.contains("relaxation section applies to model.kind: dvae only"),
        "{e}"
    );
    let e = load_err(
        &DVAE.replace(
            "  paths: [\"img/*.tis\"]\n",
            "  paths: [x]\n  bpe_dropout: 0.1\n",
        ),
        &[],
    );
    assert!(
        e.contains("data.bpe_dropout does not apply to data.source: images"),
        "{e}"
    );
}

#[test]
fn cosine_anneal_matches_the_spec_formula() {
    let r = RelaxationConfig::default();
    assert_eq!(r.tau(0), 1.0);
    assert!((r.tau(75_000) - (1.0 / 16.0 + (1.0 - 1.0 / 16.0) / 2.0)).abs() < 1e-12);
    assert_eq!(r.tau(150_000), 1.0 / 16.0);
    assert_eq!(r.tau(10_000_000), 1.0 / 16.0);
    assert_eq!(r.beta(0), 0.0);
    assert!((r.beta(2_500) - 3.3).abs() < 1e-12);
    assert_eq!(r.beta(5_000), 6.6);
}

#[test]
fn the_samples_section_is_checked() {
    let samples = "samples:\n  every: 10\n  prompts: [\"a red circle\"]\n  dvae: runs/dvae\n  tokenizer: t.json\n";
    let c = RunConfig::from_yaml_str(&format!("{MINIMAL}{samples}"), "t.yaml").unwrap();
    let s = c.samples.as_ref().unwrap();
    assert_eq!(
        (s.n, s.temperature, s.top_k, s.top_p, s.seed),
        (4, 1.0, 0, 1.0, 0)
    );
    let e = load_err(&format!("{MINIMAL}{samples}"), &["samples.every=0"]);
    assert!(e.contains("samples.every must be ≥ 1"), "{e}");
    let e = load_err(&format!("{MINIMAL}{samples}"), &["samples.top_p=0"]);
    assert!(e.contains("samples.top_p = 0 must be in (0, 1]"), "{e}");
    let e = load_err(
        &format!("{MINIMAL}{}", samples.replace("[\"a red circle\"]", "[]")),
        &[],
    );
    assert!(
        e.contains("samples.prompts must list at least one caption"),
        "{e}"
    );
    let e = load_err(
        &format!("{MINIMAL}{}", samples.replace("  tokenizer: t.json\n", "")),
        &[],
    );
    assert!(e.contains("samples.tokenizer"), "{e}");
    let e = load_err(&format!("{DVAE}{samples}"), &[]);
    assert!(
        e.contains("samples section applies to model.kind: transformer only"),
        "{e}"
    );
}
