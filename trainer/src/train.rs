//! The training loop of `trainer train`: build the model named by the config (the stage-2
//! transformer or the stage-1 dVAE, each an [`objectives::Objective`]), start fresh or resume from the
//! newest checkpoint that verifies ([`resume`]), then per update: accumulate gradients over
//! micro-batches, clip, AdamW, EMA, schedule; log JSON lines (`metrics.jsonl`) and the same
//! numbers as TensorBoard events ([`crate::tensorboard`]); checkpoint.
//!
//! Resume is bit-exact: every piece of state that an update reads (weights, AdamW moments and
//! update count, EMA, schedule state, data cursor) is saved exactly, and every reduction is done
//! in a fixed order, so N updates + resume + M updates equal N + M updates straight, byte for byte.

pub mod objectives;
pub mod resident;
pub mod resume;

use crate::checkpoint::{self, TensorEntry, TensorFile, EMA_FILE, MODEL_FILE, OPTIMIZER_FILE};
use crate::config::{Device, Precision, RunConfig};
use crate::data::DataCursor;
use crate::model::mixed::{unscale_param_grads, BlockScales};
use crate::optim::{AdamW, AdamWParams, LrSchedule, ScheduleParams, StepReport};
use crate::params::ParamTable;
use crate::powersgd::{
    CompressionKind, PowerSgd, PowerSgdSnapshot, CHECKPOINT_FILE as POWERSGD_FILE,
};
use crate::tensorboard::EventWriter;
use anyhow::{bail, Context, Result};
use dist::run_lock::RunLock;
use kernels::adamw::ema_update;
use kernels::gradscale::{GradScaler, StepOutcome};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

pub use resume::BatchLedger;

/// Everything besides the tensors that a resumed run needs, saved as `state.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Updates completed.
    pub step: u64,
    /// Where the data stands: the next synthetic sample, or the shard loader's epoch and
    /// position (see [`DataCursor`]).
    pub data: DataCursor,
    /// AdamW's update count (differs from `step` when non-finite updates were skipped).
    pub adam_t: u64,
    pub schedule: LrSchedule,
    /// Updates skipped because the gradient was not finite.
    pub skipped_updates: u64,
    /// PowerSGD's reduction count when `compression.kind: powersgd` (its error buffers are in
    /// `powersgd.safetensors` beside this file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub powersgd_iterations: Option<u64>,
    /// The per-resblock gradient scales of an fp16 run (`run.precision: fp16`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_scaler: Option<ScalerState>,
    /// The batch arithmetic that leads from the step to the data cursor (absent in checkpoints
    /// written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batches: Option<BatchLedger>,
}

/// [`GradScaler`]'s state in `state.json`: scale i is `replicas · 2^(log2_milli[i] / 1000)`,
/// `since_decrease[i]` updates since it last came down.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScalerState {
    pub replicas: u32,
    pub log2_milli: Vec<i32>,
    pub since_decrease: Vec<u32>,
}

impl ScalerState {
    fn of(s: &GradScaler) -> Self {
        ScalerState {
            replicas: s.replicas(),
            log2_milli: s.log2_milli().to_vec(),
            since_decrease: s.since_decrease().to_vec(),
        }
    }
}

/// The fp16 run's scaler: the saved one, or a fresh one (M·2^13 each) for a run that starts in
/// fp16 or resumes an fp32 checkpoint in fp16.
fn grad_scaler(state: &TrainState, resblocks: usize, replicas: usize) -> Result<GradScaler> {
    match &state.grad_scaler {
        Some(s) if s.log2_milli.len() == resblocks => {
            Ok(
                GradScaler::from_state(s.replicas, s.log2_milli.clone(), s.since_decrease.clone())
                    .context("state.json: grad_scaler")?,
            )
        }
        Some(s) => bail!(
            "state.json: grad_scaler has {} scales, the model has {resblocks} resblocks",
            s.log2_milli.len()
        ),
        None => {
            if state.step > 0 {
                tracing::info!(step = state.step, "resuming an fp32 checkpoint in fp16");
            }
            let replicas = u32::try_from(replicas).context("world size")?;
            Ok(GradScaler::new(resblocks / 2, replicas))
        }
    }
}

/// One line of `metrics.jsonl`: the fields every model has, then the model's own (the
/// transformer: `loss_text`, `loss_image`, `tokens_per_s`, `image_tokens_per_s`; the dVAE: `nll`
/// per sub-pixel, `kl` per grid position, `tau`, `beta`, `codebook_perplexity`, `recon_mse`,
/// `images_per_s`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Metrics {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub skipped: bool,
    pub step_ms: f64,
    pub gflops_per_s: f64,
    /// Model FLOPs utilisation: `gflops_per_s` over [`peak_gflops`].
    pub mfu: f64,
    /// The model's own values, by name.
    #[serde(flatten)]
    pub values: BTreeMap<String, f64>,
}

impl Metrics {
    /// A model-specific value by name (`loss_text`, `recon_mse`, …).
    pub fn get(&self, name: &str) -> Option<f64> {
        self.values.get(name).copied()
    }

    /// Every number of the line under its `metrics.jsonl` name (`skipped` as 0 or 1), as
    /// TensorBoard's scalars.
    pub fn scalars(&self) -> impl Iterator<Item = (&str, f64)> {
        [
            ("loss", self.loss),
            ("lr", self.lr),
            ("grad_norm", self.grad_norm),
            ("skipped", f64::from(u8::from(self.skipped))),
            ("step_ms", self.step_ms),
            ("gflops_per_s", self.gflops_per_s),
            ("mfu", self.mfu),
        ]
        .into_iter()
        .chain(self.values.iter().map(|(k, &v)| (k.as_str(), v)))
    }
}

/// What a finished run reports.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    pub final_step: u64,
    pub resumed_from: Option<u64>,
    pub last: Option<Metrics>,
    pub out_dir: PathBuf,
    /// True when a stop request ended the run before `train.steps`.
    pub stopped: bool,
}

/// The peak the MFU is measured against: `TESSERA_PEAK_GFLOPS` when set, else this machine's
/// measured dense f32 GEMM throughput (the practical peak of the CPU path).
pub fn peak_gflops() -> f64 {
    std::env::var("TESSERA_PEAK_GFLOPS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|p| *p > 0.0)
        .unwrap_or_else(|| kernels::linear::measure_gemm_gflops(768, 3))
}

/// Refuses devices this build cannot run on, with what to do instead: `run.device: cuda`
/// without a usable GPU (the same error for every model).
pub fn check_device(cfg: &RunConfig) -> Result<()> {
    if cfg.run.device == Device::Cuda {
        // Before any data is read: the driver, NVRTC and a device, or an error naming what is
        // missing and where it was looked for.
        let ordinal = std::env::var("LOCAL_RANK")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        kernels::gpu::Cuda::new(ordinal).context("run.device = cuda")?;
    }
    Ok(())
}

fn schedule_params(cfg: &RunConfig) -> ScheduleParams {
    let s = &cfg.schedule;
    ScheduleParams {
        kind: s.kind,
        peak_lr: cfg.optim.lr,
        warmup_steps: s.warmup_steps,
        min_lr: s.min_lr,
        total_steps: cfg.schedule_total_steps(),
        plateau_patience: s.plateau_patience,
        plateau_window: s.plateau_window as usize,
        plateau_factor: s.plateau_factor,
    }
}

/// The model, optimizer and schedule state of a run in memory.
struct RunState {
    params: Vec<f32>,
    adam: AdamW,
    ema: Option<Vec<f32>>,
    state: TrainState,
}

fn fresh_state(cfg: &RunConfig, params: Vec<f32>) -> RunState {
    let o = &cfg.optim;
    let hp = AdamWParams {
        beta1: o.beta1 as f32,
        beta2: o.beta2 as f32,
        eps: o.eps as f32,
        weight_decay: o.weight_decay as f32,
        grad_clip: o.grad_clip as f32,
    };
    RunState {
        ema: (o.ema > 0.0).then(|| params.clone()),
        adam: AdamW::new(hp, params.len()),
        params,
        state: TrainState {
            step: 0,
            data: DataCursor::start(cfg),
            adam_t: 0,
            schedule: LrSchedule::new(&schedule_params(cfg)),
            skipped_updates: 0,
            powersgd_iterations: None,
            grad_scaler: None,
            batches: None,
        },
    }
}

/// Writes a checkpoint of `rs` (and of PowerSGD's state, when compressing).
fn save_state(
    cfg: &RunConfig,
    table: &ParamTable,
    rs: &RunState,
    powersgd: Option<&PowerSgdSnapshot>,
) -> Result<PathBuf> {
    let mut files = vec![
        TensorFile {
            file_name: MODEL_FILE,
            tensors: checkpoint::entries(table, "", &rs.params),
        },
        TensorFile {
            file_name: OPTIMIZER_FILE,
            tensors: checkpoint::entries(table, "m.", &rs.adam.m)
                .into_iter()
                .chain(checkpoint::entries(table, "v.", &rs.adam.v))
                .collect::<Vec<TensorEntry>>(),
        },
    ];
    if let Some(ema) = &rs.ema {
        files.push(TensorFile {
            file_name: EMA_FILE,
            tensors: checkpoint::entries(table, "", ema),
        });
    }
    let mut state = rs.state.clone();
    if let Some(snap) = powersgd {
        files.push(TensorFile {
            file_name: POWERSGD_FILE,
            tensors: snap.entries(""),
        });
        state.powersgd_iterations = Some(snap.iterations);
    }
    let state = serde_json::to_value(&state)?;
    Ok(checkpoint::save(
        &cfg.run.out_dir,
        rs.state.step,
        &files,
        &state,
        &cfg.to_yaml(),
        cfg.checkpoint.keep_last,
    )?)
}

/// Keeps the lines of `metrics.jsonl` up to `step` (those after it belong to updates that are
/// about to be redone after a resume).
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    formats::fsutil::write_atomic(path, kept.as_bytes(), true)
        .with_context(|| format!("rewriting {}", path.display()))
}

/// Runs `trainer train`. With `resume`, continues from the newest checkpoint in `run.out_dir`
/// that verifies, when there is one ([`resume`]: damaged ones are set aside). Rank 0
/// holds `run.out_dir`'s lock ([`dist::run_lock`]) while it runs.
pub fn run(cfg: &RunConfig, resume: bool) -> Result<TrainSummary> {
    run_until(cfg, resume, &AtomicBool::new(false))
}

/// [`run`], and when `stop` becomes true (the binary sets it on SIGTERM or SIGINT) finishes the
/// update in flight, writes a checkpoint and returns early with `stopped` set.
pub fn run_until(cfg: &RunConfig, resume: bool, stop: &AtomicBool) -> Result<TrainSummary> {
    check_device(cfg)?;
    // Before anything the size of the model or batch is allocated.
    crate::memory::check(cfg, crate::memory::ranks_on_this_node())?;
    let out = &cfg.run.out_dir;
    // One run per directory: rank 0 holds the lock until this process ends, before it reads or
    // renames a checkpoint.
    let rank = dist::env::WorkerEnv::from_env()?.map(|e| e.rank);
    let _lock = if dist::run_lock::this_process_locks(rank) {
        Some(RunLock::acquire(out)?)
    } else {
        None
    };
    // The model's definition alone (no data yet): the checkpoint layout.
    let (table, _) = objectives::model_table(cfg, false)?;
    // Multi-process runs (torchrun's variables set): rendezvous, heartbeats, ring collectives.
    // Only rank 0 writes the run directory (config, metrics, checkpoints).
    let mut comm = dist::connect(&dist::RunInfo {
        distributed: cfg.distributed.clone(),
        device: cfg.run.device,
        config_hash: cfg.hash(),
    })?;
    let rank0 = comm.rank() == 0;
    fs::create_dir_all(out).with_context(|| format!("creating run directory {}", out.display()))?;
    let metrics_path = out.join("metrics.jsonl");

    let mut resumed_from = None;
    let mut resumed_dir = None;
    let mut rs = match resume::choose(cfg, &table, &mut *comm, resume)? {
        Some(loaded) => {
            resumed_from = Some(loaded.rs.state.step);
            if rank0 {
                truncate_metrics(&metrics_path, loaded.rs.state.step)?;
            }
            tracing::info!(step = loaded.rs.state.step, dir = %loaded.dir.display(), "resumed");
            resumed_dir = Some(loaded.dir);
            loaded.rs
        }
        // Fresh weights from run.seed.
        None => match objectives::model_table(cfg, true)? {
            (_, Some(init)) => fresh_state(cfg, init),
            _ => bail!("the model gave no initial weights"),
        },
    };
    // Every rank resumed from the same checkpoint (a run directory not shared between nodes
    // would break this).
    dist::same_on_every_rank(&mut *comm, "the step resumed from", rs.state.step)?;
    if resumed_from.is_none() && cfg.train.init.is_some() {
        // Each rank read train.init itself: a directory that differs between nodes, or changed
        // while they read it, must not start them from different weights.
        let fingerprint = crate::params::fingerprint(&rs.params) as u64;
        dist::same_on_every_rank(&mut *comm, "the weights of train.init", fingerprint)?;
    }
    // Only now, with the run accepted, does anything in the run directory change.
    let mut metrics_file = None;
    let mut events = None;
    if rank0 {
        formats::fsutil::write_atomic(&out.join("config.yaml"), cfg.to_yaml().as_bytes(), false)?;
        if resumed_from.is_none() {
            fs::write(&metrics_path, "")
                .with_context(|| format!("creating {}", metrics_path.display()))?;
        }
        metrics_file = Some(
            fs::OpenOptions::new()
                .append(true)
                .open(&metrics_path)
                .with_context(|| format!("opening {}", metrics_path.display()))?,
        );
        events = Some(EventWriter::create(out, resumed_from)?);
    }

    // Rank 0's sample grids: the dVAE and tokenizer load now, before any data is read.
    let samples = match rank0 {
        true => crate::sample::TrainingSamples::open(cfg)?,
        false => None,
    };
    let mut objective = objectives::open(cfg, comm.rank(), comm.world_size(), rs.state.data)?;
    resume::settle_ledger(&mut rs.state, cfg, comm.world_size(), objective.cursor());
    // A device-resident model takes the (fresh or resumed) state once; the host copies are
    // refreshed from it for each checkpoint.
    if let Some(d) = objective.device_state() {
        d.load(&rs.params, &rs.adam.m, &rs.adam.v, rs.ema.as_deref())?;
    }
    let resident = objective.device_state().is_some();
    let mut powersgd = match cfg.compression.kind {
        CompressionKind::None => None,
        CompressionKind::Powersgd => {
            let mut p = PowerSgd::new(&table, &cfg.compression)?;
            let saved = resumed_dir
                .as_ref()
                .map(|d| d.join(POWERSGD_FILE))
                .filter(|f| f.exists());
            match (saved, rs.state.powersgd_iterations) {
                (Some(file), Some(iterations)) => p
                    .restore(&file, "", iterations)
                    .with_context(|| format!("restoring PowerSGD from {}", file.display()))?,
                _ if resumed_dir.is_some() => tracing::warn!(
                    "the checkpoint has no PowerSGD state (compression was off): error buffers \
                     start from zero"
                ),
                _ => {}
            }
            tracing::info!(
                rank = cfg.compression.rank,
                compressed = p.compressed().len(),
                buckets = p.buckets().len(),
                "PowerSGD"
            );
            Some(p)
        }
    };
    let sched = schedule_params(cfg);
    let accum = cfg.train.grad_accum;
    let mut grads = vec![0.0f32; table.numel()];
    let step_flops = objective.micro_flops() * accum as f64;
    let peak_gflops = peak_gflops();
    tracing::info!(
        peak_gflops = format_args!("{peak_gflops:.1}"),
        "MFU denominator"
    );
    tracing::info!(
        model = %cfg.model.kind(),
        params = table.numel(),
        steps = cfg.train.steps,
        batch = cfg.train.batch_size,
        grad_accum = accum,
        "training"
    );
    // fp16: one gradient scale per resblock (docs/model.md §5), saved in state.json.
    let resblocks = objective.resblock_ranges();
    let mut scaler = match cfg.run.precision {
        Precision::Fp16 => Some(grad_scaler(&rs.state, resblocks.len(), comm.world_size())?),
        Precision::Fp32 => {
            if rs.state.grad_scaler.take().is_some() {
                tracing::info!(step = rs.state.step, "resuming an fp16 checkpoint in fp32");
            }
            None
        }
    };
    let mut last = None;
    let mut logged_device_reduce = false;
    // Rank 0's bar on a terminal (updates, rate, ETA); other ranks and log files see none.
    let bar = match rank0 {
        true => crate::progress::bar(cfg.train.steps, "train"),
        false => indicatif::ProgressBar::hidden(),
    };
    bar.set_position(rs.state.step);
    while rs.state.step < cfg.train.steps {
        let started = Instant::now();
        let t = rs.state.step + 1;
        grads.fill(0.0);
        let scales: Vec<f32> = match &scaler {
            Some(s) => (0..s.len()).map(|i| s.scale(i)).collect(),
            None => Vec::new(),
        };
        let mut flags = vec![0u32; scales.len()];
        // Loss terms, averaged over the micro-batches, in the order the model reports them.
        let mut terms: Vec<(&'static str, f64)> = Vec::new();
        for micro in 0..accum {
            let scale = 1.0 / accum as f32;
            let scaling = scaler.is_some().then(|| BlockScales {
                scales: &scales,
                flags: &mut flags,
            });
            let got = objective.micro_step(t, micro, &rs.params, &mut grads, scale, scaling)?;
            rs.state.data = objective.cursor();
            if terms.is_empty() {
                terms = got.iter().map(|&(k, _)| (k, 0.0)).collect();
            }
            for (acc, (_, v)) in terms.iter_mut().zip(&got) {
                acc.1 += v / accum as f64;
            }
        }
        // The global batch's loss terms: the plateau schedule reads the loss, so every rank must
        // see the same.
        dist::mean_over_ranks(&mut *comm, &mut terms)?;
        let loss = terms.first().map(|t| t.1).unwrap_or(f64::NAN);
        // Data-parallel seam: average the gradients of every rank, plainly or through PowerSGD
        // (whose non-finite steps come back as NaN, so that AdamW skips them).
        // fp16: each rank divides its resblocks' gradients by their scales before the reduction
        // (the paper's pre-division); the flags of every rank decide, so all ranks skip together.
        let outcome = match scaler.as_mut() {
            Some(s) => {
                match objective.device_state() {
                    Some(d) => d.unscale_grads(&scales, &mut flags)?,
                    None => unscale_param_grads(&mut grads, &resblocks, &scales, &mut flags)?,
                }
                let mut raised: Vec<f32> = flags.iter().map(|&f| f as f32).collect();
                comm.all_reduce_sum(&mut raised)?;
                let raised: Vec<u32> = raised.iter().map(|&f| u32::from(f != 0.0)).collect();
                let outcome = s.update(&raised)?;
                if outcome == StepOutcome::Skipped {
                    let blocks: Vec<usize> =
                        (0..raised.len()).filter(|&i| raised[i] != 0).collect();
                    tracing::warn!(step = t, ?blocks, "fp16 gradient overflow in resblocks");
                }
                rs.state.grad_scaler = Some(ScalerState::of(s));
                outcome
            }
            None => StepOutcome::Applied,
        };
        let bytes_plain = 4 * grads.len() as u64;
        // A device-resident gradient is reduced over several ranks in device memory where the
        // transport reads it (NCCL), else through a host copy; through PowerSGD it stays on the
        // device (the factors, the uncompressed tensors and a flag cross to the host).
        let plain_over_ranks = powersgd.is_none() && comm.world_size() > 1;
        let device_reduced = match (outcome, objective.device_state()) {
            (StepOutcome::Applied, Some(d)) if plain_over_ranks => {
                d.all_reduce_grads(&mut *comm)?
            }
            _ => false,
        };
        if device_reduced && !logged_device_reduce {
            logged_device_reduce = true;
            tracing::info!("gradient reduced in GPU memory (NCCL, one grouped all-reduce)");
        }
        let host_reduction = resident && plain_over_ranks && !device_reduced;
        if let (Some(d), true) = (objective.device_state(), host_reduction) {
            d.grads_to_host(&mut grads)?;
        }
        // PowerSGD found a non-finite value on some rank: every rank skips the update.
        let mut reduce_failed = false;
        let bytes_sent = match (outcome, powersgd.as_mut()) {
            (StepOutcome::Skipped, _) => 0,
            (_, None) if device_reduced => bytes_plain,
            (_, None) if resident && !host_reduction => 0,
            (_, Some(p)) => {
                let stats = match objective.device_state() {
                    Some(d) => d.powersgd_reduce(p, &mut *comm)?,
                    None => p.reduce(&mut grads, &mut *comm)?,
                };
                reduce_failed = stats.non_finite;
                stats.bytes_sent
            }
            (_, None) => {
                comm.all_reduce_sum(&mut grads)?;
                if comm.world_size() > 1 {
                    let inv = 1.0 / comm.world_size() as f32;
                    grads.iter_mut().for_each(|g| *g *= inv);
                }
                bytes_plain
            }
        };
        if let (Some(d), true) = (objective.device_state(), host_reduction) {
            d.grads_from_host(&grads)?;
        }
        let lr = rs.state.schedule.lr(&sched, t);
        let report = match (outcome, objective.device_state()) {
            _ if reduce_failed => StepReport {
                grad_norm: f64::NAN,
                applied: false,
            },
            (StepOutcome::Applied, None) => {
                rs.adam.step(&table, &mut rs.params, &grads, lr as f32)?
            }
            (StepOutcome::Applied, Some(d)) => {
                let r = d.adam_step(&rs.adam.hp, lr as f32, rs.adam.t + 1)?;
                if r.applied {
                    rs.adam.t += 1;
                }
                r
            }
            (StepOutcome::Skipped, _) => StepReport {
                grad_norm: f64::NAN,
                applied: false,
            },
        };
        if report.applied {
            if objective.device_state().is_none() {
                objective.after_update(&mut rs.params);
            }
            match (rs.ema.as_mut(), objective.device_state()) {
                (Some(_), Some(d)) => d.ema_update(cfg.optim.ema as f32)?,
                (Some(ema), None) => ema_update(ema, &rs.params, cfg.optim.ema as f32)?,
                (None, _) => {}
            }
        } else {
            rs.state.skipped_updates += 1;
            tracing::warn!(step = t, "non-finite gradient: update skipped");
        }
        rs.state.schedule.observe(&sched, t, loss);
        rs.state.adam_t = rs.adam.t;
        rs.state.step = t;
        let secs = started.elapsed().as_secs_f64();
        let gflops = step_flops / secs / 1e9;
        let mut values: BTreeMap<String, f64> = terms
            .iter()
            .skip(1)
            .chain(&objective.update_metrics(t))
            .map(|&(k, v)| (k.to_string(), v))
            .collect();
        if !scales.is_empty() {
            // The scales this update used.
            let mut sorted = scales.clone();
            sorted.sort_by(f32::total_cmp);
            values.insert("grad_scale_min".into(), sorted[0] as f64);
            values.insert("grad_scale_median".into(), sorted[sorted.len() / 2] as f64);
            values.insert("grad_scale_max".into(), sorted[sorted.len() - 1] as f64);
            values.insert("skipped_updates".into(), rs.state.skipped_updates as f64);
        }
        for (k, v) in objective.rates(secs) {
            values.insert(k.to_string(), v * accum as f64);
        }
        if comm.world_size() > 1 || powersgd.is_some() {
            values.insert("bytes_sent".into(), bytes_sent as f64);
            values.insert("bytes_uncompressed".into(), bytes_plain as f64);
        }
        let m = Metrics {
            step: t,
            loss,
            lr,
            grad_norm: report.grad_norm,
            skipped: !report.applied,
            step_ms: secs * 1e3,
            gflops_per_s: gflops,
            mfu: gflops / peak_gflops,
            values,
        };
        let log_every = cfg.train.log_every.max(1);
        if t.is_multiple_of(log_every) || t == cfg.train.steps || t == 1 {
            if let Some(f) = metrics_file.as_mut() {
                writeln!(f, "{}", serde_json::to_string(&m)?)
                    .with_context(|| format!("writing {}", metrics_path.display()))?;
            }
            if let Some(ev) = events.as_mut() {
                ev.scalars(t, m.scalars())?;
            }
            let shown: String = terms
                .iter()
                .skip(1)
                .map(|(k, v)| format!(" {k}={v:.4}"))
                .collect();
            bar.set_message(format!("loss {loss:.4}"));
            bar.suspend(|| {
                tracing::info!(
                    step = t,
                    loss = format_args!("{loss:.4}{shown}"),
                    lr = format_args!("{lr:.3e}"),
                    grad_norm = format_args!("{:.3}", report.grad_norm),
                    ms = format_args!("{:.1}", m.step_ms),
                    "step"
                )
            });
        }
        bar.set_position(t);
        last = Some(m);
        let every = cfg.checkpoint.every;
        // A stop request that reached any rank stops every rank after this same update.
        let stopping = dist::any_rank(&mut *comm, stop.load(Ordering::Relaxed))?;
        if t == cfg.train.steps || (every > 0 && t.is_multiple_of(every)) || stopping {
            // The snapshot is collective (the mean error over ranks): every rank takes it.
            let snap = match powersgd.as_mut() {
                Some(p) => {
                    if let Some(d) = objective.device_state() {
                        d.powersgd_store(p)?;
                    }
                    Some(p.snapshot(&mut *comm)?)
                }
                None => None,
            };
            if let Some(d) = objective.device_state() {
                d.store(
                    &mut rs.params,
                    &mut rs.adam.m,
                    &mut rs.adam.v,
                    rs.ema.as_deref_mut(),
                )?;
            }
            if rank0 {
                let dir = save_state(cfg, &table, &rs, snap.as_ref())?;
                bar.suspend(|| tracing::info!(dir = %dir.display(), "checkpoint"));
            }
            // No rank runs ahead of (or exits before) a half-written checkpoint.
            comm.barrier()?;
        }
        if let Some(s) = samples.as_ref().filter(|s| s.due(t, cfg.train.steps)) {
            // This moment's weights (the EMA where the run keeps one) on the host.
            if let Some(d) = objective.device_state() {
                d.store(
                    &mut rs.params,
                    &mut rs.adam.m,
                    &mut rs.adam.v,
                    rs.ema.as_deref_mut(),
                )?;
            }
            let weights = rs.ema.as_deref().unwrap_or(&rs.params);
            let path = s.draw(t, weights, events.as_mut())?;
            bar.suspend(|| tracing::info!(path = %path.display(), "samples"));
        }
        if stopping && t < cfg.train.steps {
            tracing::warn!(step = t, "stop requested: checkpoint written, exiting");
            return Ok(TrainSummary {
                final_step: t,
                resumed_from,
                last,
                out_dir: out.clone(),
                stopped: true,
            });
        }
    }
    bar.finish_and_clear();
    Ok(TrainSummary {
        final_step: rs.state.step,
        resumed_from,
        last,
        out_dir: out.clone(),
        stopped: false,
    })
}
