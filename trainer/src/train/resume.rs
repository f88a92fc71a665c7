//! Where a run starts: the newest checkpoint of `run.out_dir` that verifies, or a fresh start.
//!
//! Verifying a checkpoint (`load_verified`) means: every file read matches `manifest.json`
//! (length and xxh3-128; a checkpoint written before manifests loads with a warning); the saved
//! config describes the same model (else the run stops: that is the config's fault, not the
//! checkpoint's); `state.json` is consistent ([`check_state`]: its step is the directory's, AdamW's
//! update count plus the skipped updates is the step, and the data cursor is where the
//! [`BatchLedger`]'s batch arithmetic leads); weights, moments and EMA are finite and second
//! moments are not negative.
//!
//! Rank 0 alone chooses (`choose`): it first sets aside every `step_*` directory without
//! `DONE`, then tries the complete checkpoints newest first, setting aside each one that fails
//! with damage (renamed `step_<step>.corrupt-<what>-<unix seconds>`, never deleted, a warning
//! naming the failure), until one loads. It then broadcasts the step it chose; the other ranks
//! open only that checkpoint, after every rename is done, so no rank reads a directory while it
//! is being renamed, and every rank starts from the same step. Rank 0 also holds the run
//! directory's lock ([`dist::run_lock`]), so no other run renames or writes beside it.
//!
//! When checkpoints exist but none verifies, the run does not start over on top of them: it
//! stops with the reasons, and keeps refusing a fresh start while `checkpoints/` holds
//! checkpoints set aside as corrupt and none that verifies (move them away to start over).

use super::{fresh_state, RunState, TrainState};
use crate::checkpoint::{
    self, CheckpointDir, CheckpointError, EMA_FILE, MODEL_FILE, OPTIMIZER_FILE,
};
use crate::config::RunConfig;
use crate::data::loader::Cursor;
use crate::data::DataCursor;
use crate::params::ParamTable;
use crate::powersgd::{CompressionKind, CHECKPOINT_FILE as POWERSGD_FILE};
use anyhow::{anyhow, bail, Context, Result};
use dist::collectives::Collectives;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The batch arithmetic of a run, saved in `state.json` under `batches`: from update
/// `since_step`, where the data cursor stood at `since`, every update takes `grad_accum` global
/// batches of `batch_size · world_size` records. A run starts a new ledger when it starts fresh
/// or resumes with another batch size, accumulation or world size (or from a checkpoint that
/// has none), so the cursor of any later checkpoint can be checked against its step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchLedger {
    pub batch_size: u64,
    pub grad_accum: u64,
    pub world_size: u64,
    pub since_step: u64,
    pub since: DataCursor,
}

impl BatchLedger {
    /// The ledger of `cfg` at `world_size` ranks, starting at update `step` with the data at
    /// `cursor` (the stream's own cursor, after it opened).
    pub fn new(cfg: &RunConfig, world_size: usize, step: u64, cursor: DataCursor) -> BatchLedger {
        BatchLedger {
            batch_size: cfg.train.batch_size as u64,
            grad_accum: cfg.train.grad_accum as u64,
            world_size: world_size as u64,
            since_step: step,
            since: cursor,
        }
    }

    fn same_geometry(&self, other: &BatchLedger) -> bool {
        (self.batch_size, self.grad_accum, self.world_size)
            == (other.batch_size, other.grad_accum, other.world_size)
    }

    /// Checks that the data cursor at update `step` is where this ledger's batches lead.
    pub fn check(&self, step: u64, cursor: &DataCursor) -> Result<(), String> {
        let updates = step.checked_sub(self.since_step).ok_or_else(|| {
            format!(
                "batches.since_step {} is after the step {step}",
                self.since_step
            )
        })?;
        let global = self
            .batch_size
            .checked_mul(self.world_size)
            .filter(|&g| g > 0)
            .ok_or("batches: batch_size · world_size is 0 or overflows")?;
        let batches = updates
            .checked_mul(self.grad_accum)
            .ok_or("batches: the batch count overflows")?;
        let arithmetic = || {
            format!(
                "{updates} updates × {} micro-batches × {} records × {} ranks since step {}",
                self.grad_accum, self.batch_size, self.world_size, self.since_step
            )
        };
        match (&self.since, cursor) {
            (
                DataCursor::Synthetic { next_sample: from },
                DataCursor::Synthetic { next_sample: to },
            ) => {
                let want = batches
                    .checked_mul(global)
                    .and_then(|n| n.checked_add(*from));
                if want != Some(*to) {
                    return Err(format!(
                        "data.next_sample is {to}, but {} from {from} lead to {}",
                        arithmetic(),
                        want.map_or("an overflow".to_string(), |w| w.to_string())
                    ));
                }
                Ok(())
            }
            (
                DataCursor::Shards {
                    epoch: e0,
                    position: p0,
                    records: n0,
                },
                DataCursor::Shards {
                    epoch,
                    position,
                    records,
                },
            )
            | (
                DataCursor::Images {
                    epoch: e0,
                    position: p0,
                    records: n0,
                },
                DataCursor::Images {
                    epoch,
                    position,
                    records,
                },
            ) => {
                if n0 != records {
                    return Err(format!(
                        "data.records is {records}, but batches.since counts {n0}"
                    ));
                }
                let from = Cursor {
                    epoch: *e0,
                    position: *p0,
                };
                let to = Cursor {
                    epoch: *epoch,
                    position: *position,
                };
                match batches_between(from, to, global, *records) {
                    Some(n) if n == batches => Ok(()),
                    found => Err(format!(
                        "data cursor epoch {epoch} position {position} is {} global batches of \
                         {global} from epoch {e0} position {p0} over {records} records, but {} \
                         make {batches}",
                        found.map_or("not a whole number of".to_string(), |n| n.to_string()),
                        arithmetic()
                    )),
                }
            }
            (from, to) => Err(format!(
                "data.source is {}, but batches.since is {}",
                to.source_name(),
                from.source_name()
            )),
        }
    }
}

/// How many global batches of `global` records over `records` lead the loader from `from` to
/// `to` ([`Cursor::advance`], after the loader normalises its start): `None` when `to` is not a
/// cursor the loader reaches from `from`.
pub fn batches_between(from: Cursor, to: Cursor, global: u64, records: u64) -> Option<u64> {
    let per_epoch = records / global.max(1);
    if global == 0 || per_epoch == 0 {
        return None;
    }
    let from = from.normalise(global, records);
    // Every cursor the loader leaves has a whole batch ahead of it in its epoch.
    if to.position.checked_add(global)? > records || to.epoch < from.epoch {
        return None;
    }
    if to.epoch == from.epoch {
        let ahead = to.position.checked_sub(from.position)?;
        return ahead.is_multiple_of(global).then_some(ahead / global);
    }
    if !to.position.is_multiple_of(global) {
        return None;
    }
    let rest_of_first = (records - from.position) / global;
    let whole_epochs = (to.epoch - from.epoch - 1).checked_mul(per_epoch)?;
    rest_of_first
        .checked_add(whole_epochs)?
        .checked_add(to.position / global)
}

/// The consistency checks of a checkpoint's `state.json` (see the module doc). `Ok(false)` when
/// it passed but has no ledger (a checkpoint written before ledgers), so the data cursor went
/// unchecked.
pub fn check_state(state: &TrainState, dir_step: u64) -> Result<bool, String> {
    if state.step != dir_step {
        return Err(format!(
            "step is {}, but the directory is the checkpoint of step {dir_step}",
            state.step
        ));
    }
    if state.adam_t.checked_add(state.skipped_updates) != Some(state.step) {
        return Err(format!(
            "adam_t {} + skipped_updates {} is not the step {}: every update either steps AdamW \
             or is skipped",
            state.adam_t, state.skipped_updates, state.step
        ));
    }
    match &state.batches {
        Some(ledger) => ledger.check(state.step, &state.data).map(|()| true),
        None => Ok(false),
    }
}

/// Keeps `state`'s ledger when it describes this run's batch geometry, else starts a new one at
/// its step and `cursor` (the data stream's cursor after it opened).
pub(super) fn settle_ledger(
    state: &mut TrainState,
    cfg: &RunConfig,
    world_size: usize,
    cursor: DataCursor,
) {
    let now = BatchLedger::new(cfg, world_size, state.step, cursor);
    match &state.batches {
        Some(saved) if saved.same_geometry(&now) => {}
        Some(saved) => {
            tracing::info!(
                from = format_args!(
                    "{}×{}×{}",
                    saved.batch_size, saved.grad_accum, saved.world_size
                ),
                to = format_args!("{}×{}×{}", now.batch_size, now.grad_accum, now.world_size),
                "batch geometry (batch × accumulation × ranks) changed: new batch ledger"
            );
            state.batches = Some(now);
        }
        None => state.batches = Some(now),
    }
}

/// Why a checkpoint was not loaded: damage (set it aside and try an older one), or a problem
/// that an older checkpoint would not fix (stop the run).
enum Refusal {
    Damaged { label: String, error: anyhow::Error },
    Fatal(anyhow::Error),
}

impl From<CheckpointError> for Refusal {
    fn from(e: CheckpointError) -> Refusal {
        match e.damage() {
            Some(what) => Refusal::Damaged {
                label: format!("corrupt-{what}"),
                error: e.into(),
            },
            None => Refusal::Fatal(e.into()),
        }
    }
}

fn damaged(label: &str, error: anyhow::Error) -> Refusal {
    Refusal::Damaged {
        label: label.to_string(),
        error,
    }
}

/// A checkpoint loaded and verified.
pub(super) struct Loaded {
    pub dir: PathBuf,
    pub rs: RunState,
}

/// Loads and verifies the checkpoint `dir` for `cfg` (see the module doc).
fn load_verified(dir: &Path, cfg: &RunConfig, table: &ParamTable) -> Result<Loaded, Refusal> {
    let ck = checkpoint::load_checked(dir)?;
    let step = ck
        .step()
        .ok_or_else(|| Refusal::Fatal(anyhow!("{} is not a step_* directory", dir.display())))?;
    check_same_model(&ck, cfg)?;

    let value = ck.state()?;
    let state: TrainState = serde_json::from_value(value).map_err(|e| {
        damaged(
            "corrupt-state",
            anyhow!(
                "{}: state.json does not describe a training state: {e}",
                dir.display()
            ),
        )
    })?;
    let ledger = check_state(&state, step).map_err(|why| {
        damaged(
            "corrupt-state",
            anyhow!("{}: inconsistent state.json: {why}", dir.display()),
        )
    })?;

    let mut rs = fresh_state(cfg, vec![0.0; table.numel()]);
    ck.load_into(MODEL_FILE, table, "", &mut rs.params)?;
    ck.load_many(
        OPTIMIZER_FILE,
        table,
        &mut [("m.", &mut rs.adam.m), ("v.", &mut rs.adam.v)],
    )?;
    if let Some(ema) = rs.ema.as_mut() {
        ck.load_into(EMA_FILE, table, "", ema)?;
    }
    let finite = |file: &str, prefix: &str, buf: &[f32]| match first_non_finite(table, buf) {
        Some((name, i, x)) => Err(damaged(
            "corrupt-nonfinite",
            anyhow!(
                "{}: tensor '{prefix}{name}' holds {x} at index {i}: a checkpoint with \
                 non-finite values cannot train on",
                dir.join(file).display()
            ),
        )),
        None => Ok(()),
    };
    finite(MODEL_FILE, "", &rs.params)?;
    finite(OPTIMIZER_FILE, "m.", &rs.adam.m)?;
    finite(OPTIMIZER_FILE, "v.", &rs.adam.v)?;
    if let Some(ema) = &rs.ema {
        finite(EMA_FILE, "", ema)?;
    }
    if let Some((name, i, x)) = first_negative(table, &rs.adam.v) {
        return Err(damaged(
            "corrupt-moments",
            anyhow!(
                "{}: second moment 'v.{name}' is {x} at index {i}; AdamW's v is never negative",
                dir.join(OPTIMIZER_FILE).display()
            ),
        ));
    }
    // PowerSGD reads its file by path later; check it now, while an older checkpoint can still
    // be chosen instead.
    if cfg.compression.kind == CompressionKind::Powersgd && ck.has_file(POWERSGD_FILE) {
        ck.verify_file(POWERSGD_FILE)?;
    }
    warn_unverified(&ck, ledger);
    rs.adam.t = state.adam_t;
    rs.state = state;
    Ok(Loaded {
        dir: dir.to_path_buf(),
        rs,
    })
}

fn warn_unverified(ck: &CheckpointDir, ledger: bool) {
    if !ck.has_manifest() {
        tracing::warn!(
            dir = %ck.path().display(),
            "checkpoint written before checksums (no manifest.json): its files are loaded \
             unverified"
        );
    }
    if !ledger {
        tracing::warn!(
            dir = %ck.path().display(),
            "state.json has no batch ledger (written before ledgers): its data cursor is not \
             checked against the step"
        );
    }
}

/// Checks that a checkpoint was written by a run with the same model (a mismatch is the
/// config's fault: fatal).
fn check_same_model(ck: &CheckpointDir, cfg: &RunConfig) -> Result<(), Refusal> {
    let dir = ck.path();
    let text = ck.config_yaml()?;
    let origin = dir.join(checkpoint::CONFIG_FILE).display().to_string();
    let saved = RunConfig::from_yaml_str(&text, &origin)
        .with_context(|| format!("reading the config saved with checkpoint {}", dir.display()))
        .map_err(Refusal::Fatal)?;
    if saved.model != cfg.model {
        return Err(Refusal::Fatal(anyhow!(
            "checkpoint {} was written for model {:?}, but the config asks for {:?}; \
             use another run.out_dir or the checkpoint's model section",
            dir.display(),
            saved.model,
            cfg.model
        )));
    }
    Ok(())
}

/// The first non-finite value of `buf` (laid out by `table`): tensor name, index, value.
fn first_non_finite<'t>(table: &'t ParamTable, buf: &[f32]) -> Option<(&'t str, usize, f32)> {
    first_where(table, buf, |x| !x.is_finite())
}

/// The first negative value of `buf` (laid out by `table`).
fn first_negative<'t>(table: &'t ParamTable, buf: &[f32]) -> Option<(&'t str, usize, f32)> {
    first_where(table, buf, |x| x < 0.0)
}

fn first_where<'t>(
    table: &'t ParamTable,
    buf: &[f32],
    bad: impl Fn(f32) -> bool,
) -> Option<(&'t str, usize, f32)> {
    table
        .specs()
        .iter()
        .zip(table.split(buf))
        .find_map(|(spec, xs)| {
            let i = xs.iter().position(|&x| bad(x))?;
            Some((spec.name.as_str(), i, xs[i]))
        })
}

/// What rank 0 tells the others: no checkpoint, the step of the one it chose, or that it failed.
const CHOSE_NOTHING: u64 = 0;
const RANK0_FAILED: u64 = u64::MAX;

/// Where this run starts (every rank calls it): `None` for a fresh start, else the verified
/// checkpoint loaded. Without `resume`, refuses a run directory that holds checkpoints.
pub(super) fn choose(
    cfg: &RunConfig,
    table: &ParamTable,
    comm: &mut dyn Collectives,
    resume: bool,
) -> Result<Option<Loaded>> {
    let out = &cfg.run.out_dir;
    if !resume {
        if !checkpoint::list_complete(out)?.is_empty() {
            bail!(
                "{} already holds checkpoints; resume (drop --no-resume) or choose another \
                 run.out_dir",
                out.display()
            );
        }
        return Ok(None);
    }
    if comm.rank() == 0 {
        let chosen = choose_on_rank0(cfg, table);
        let code = match &chosen {
            Ok(Some(l)) => l.rs.state.step + 1,
            Ok(None) => CHOSE_NOTHING,
            Err(_) => RANK0_FAILED,
        };
        broadcast_u64(comm, code)?;
        return chosen;
    }
    match broadcast_u64(comm, 0)? {
        CHOSE_NOTHING => Ok(None),
        RANK0_FAILED => {
            bail!("rank 0 could not choose a checkpoint to resume from (its log says why)")
        }
        code => {
            let dir = checkpoint::step_dir(out, code - 1);
            match load_verified(&dir, cfg, table) {
                Ok(l) => Ok(Some(l)),
                Err(Refusal::Fatal(e) | Refusal::Damaged { error: e, .. }) => {
                    Err(e.context(format!(
                        "rank {}: checkpoint {}, which rank 0 verified, does not load here \
                         (run.out_dir must be one directory that every node sees)",
                        comm.rank(),
                        dir.display()
                    )))
                }
            }
        }
    }
}

fn choose_on_rank0(cfg: &RunConfig, table: &ParamTable) -> Result<Option<Loaded>> {
    let out = &cfg.run.out_dir;
    for (_, dir) in checkpoint::list_incomplete(out)? {
        let moved = checkpoint::set_aside(&dir, "incomplete")?;
        tracing::warn!(
            dir = %dir.display(),
            set_aside_as = %moved.display(),
            "checkpoint directory without DONE (an interrupted copy or a lost marker): never \
             loaded, set aside"
        );
    }
    let mut failures = Vec::new();
    for (_, dir) in checkpoint::list_complete(out)?.into_iter().rev() {
        match load_verified(&dir, cfg, table) {
            Ok(loaded) => return Ok(Some(loaded)),
            Err(Refusal::Fatal(e)) => return Err(e),
            Err(Refusal::Damaged { label, error }) => {
                let moved = checkpoint::set_aside(&dir, &label)?;
                tracing::warn!(
                    dir = %dir.display(),
                    set_aside_as = %moved.display(),
                    "checkpoint failed verification and was set aside: {error:#}"
                );
                failures.push(format!("{}: {error:#}", moved.display()));
            }
        }
    }
    let earlier = checkpoint::list_set_aside_corrupt(out)?;
    if !earlier.is_empty() {
        let now = if failures.is_empty() {
            String::new()
        } else {
            format!(" ({})", failures.join("; "))
        };
        bail!(
            "no checkpoint in {} verifies{now}, and the run will not start over on top of the \
             checkpoints set aside as corrupt: {}. Restore a good checkpoint, or move those \
             directories out of {} to start from step 0",
            checkpoint::checkpoints_dir(out).display(),
            earlier
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            checkpoint::checkpoints_dir(out).display()
        );
    }
    Ok(None)
}

/// Copies rank 0's `value` to every rank (four 16-bit pieces, each exact in f32).
fn broadcast_u64(comm: &mut dyn Collectives, value: u64) -> Result<u64> {
    if comm.world_size() == 1 {
        return Ok(value);
    }
    let mut pieces: Vec<f32> = (0..4)
        .map(|i| ((value >> (16 * i)) & 0xffff) as f32)
        .collect();
    comm.broadcast(&mut pieces, 0)
        .context("broadcasting the checkpoint rank 0 chose")?;
    Ok(pieces
        .iter()
        .enumerate()
        .fold(0u64, |acc, (i, p)| acc | ((*p as u64) << (16 * i))))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loader's own walk: `n` batches from `from`.
    fn walk(from: Cursor, n: u64, global: u64, records: u64) -> Cursor {
        let mut c = from.normalise(global, records);
        for _ in 0..n {
            c = c.advance(global, records);
        }
        c
    }

    #[test]
    fn batches_between_inverts_the_loaders_walk() {
        for (global, records) in [(4, 10), (3, 9), (5, 5), (2, 7), (6, 100)] {
            for (e0, p0) in [(0, 0), (0, 1), (2, 3), (1, records - 1)] {
                let from = Cursor {
                    epoch: e0,
                    position: p0,
                };
                for n in 0..40 {
                    let to = walk(from, n, global, records);
                    assert_eq!(
                        batches_between(from, to, global, records),
                        Some(n),
                        "G {global} N {records} from {from:?} to {to:?}"
                    );
                    // One record off is never a cursor the walk reaches.
                    let off = Cursor {
                        position: to.position + 1,
                        ..to
                    };
                    assert!(
                        batches_between(from, off, global, records).is_none_or(|m| m != n),
                        "G {global} N {records} {off:?}"
                    );
                }
            }
        }
        let c = |epoch, position| Cursor { epoch, position };
        assert_eq!(batches_between(c(1, 0), c(0, 0), 4, 10), None);
        assert_eq!(batches_between(c(0, 0), c(0, 8), 4, 10), None);
        assert_eq!(batches_between(c(0, 0), c(0, 0), 0, 10), None);
        assert_eq!(batches_between(c(0, 0), c(u64::MAX, 0), 4, 10), None);
    }

    fn ledger(since: DataCursor) -> BatchLedger {
        BatchLedger {
            batch_size: 4,
            grad_accum: 2,
            world_size: 3,
            since_step: 10,
            since,
        }
    }

    #[test]
    fn the_ledger_checks_the_cursor_against_the_batch_arithmetic() {
        let l = ledger(DataCursor::Synthetic { next_sample: 240 });
        // 5 updates × 2 micro-batches × 4 records × 3 ranks = 120 samples.
        l.check(15, &DataCursor::Synthetic { next_sample: 360 })
            .unwrap();
        let e = l
            .check(15, &DataCursor::Synthetic { next_sample: 364 })
            .unwrap_err();
        assert!(
            e.contains("next_sample is 364") && e.contains("lead to 360"),
            "{e}"
        );
        assert!(l
            .check(9, &DataCursor::Synthetic { next_sample: 240 })
            .unwrap_err()
            .contains("since_step 10"));
        let shards = |epoch, position, records| DataCursor::Shards {
            epoch,
            position,
            records,
        };
        let l = ledger(shards(0, 12, 50));
        // Global batches of 12 over 50 records: 12, 24, 36 | 0, 12, 24, 36 | 0 …
        l.check(10, &shards(0, 12, 50)).unwrap();
        l.check(11, &shards(0, 36, 50)).unwrap();
        l.check(12, &shards(1, 12, 50)).unwrap();
        assert!(l.check(12, &shards(1, 24, 50)).is_err());
        assert!(l
            .check(12, &shards(1, 12, 51))
            .unwrap_err()
            .contains("records"));
        let e = l
            .check(12, &DataCursor::Synthetic { next_sample: 0 })
            .unwrap_err();
        assert!(e.contains("synthetic") && e.contains("shards"), "{e}");
    }

    fn small_run(out: &Path) -> RunConfig {
        let yaml = format!(
            "run:\n  name: ranks\n  out_dir: {}\n  seed: 3\n  device: cpu\n\
             model:\n  text_len: 6\n  text_vocab: 30\n  grid: 4\n  image_vocab: 20\n  d_model: 16\n  heads: 2\n  layers: 2\n\
             data:\n  source: synthetic\n  min_caption_tokens: 2\n\
             train:\n  steps: 4\n  batch_size: 2\n\
             checkpoint:\n  every: 2\n  keep_last: 5\n",
            out.display()
        );
        RunConfig::from_yaml_str(&yaml, "test config").unwrap()
    }

    fn flip_last_byte(path: &Path) {
        let mut bytes = std::fs::read(path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(path, bytes).unwrap();
    }

    /// Three ranks over a TCP ring: rank 0 alone verifies and sets aside, every rank loads the
    /// step it chose; when rank 0 cannot choose, every rank fails.
    #[test]
    fn every_rank_loads_what_rank_0_chose_and_only_rank_0_sets_aside() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("run");
        let cfg = small_run(&out);
        crate::train::run(&cfg, true).unwrap();
        flip_last_byte(&checkpoint::step_dir(&out, 4).join(MODEL_FILE));
        let (table, _) = super::super::objectives::model_table(&cfg, false).unwrap();
        let timeout = std::time::Duration::from_secs(60);
        let got = dist::ring::with_local_rings(3, timeout, |_, ring| {
            choose(&cfg, &table, ring, true)
                .map(|l| l.map(|l| (l.dir, l.rs.state.step, l.rs.params)))
                .map_err(|e| format!("{e:#}"))
        });
        let step2 = checkpoint::step_dir(&out, 2);
        let (_, _, params) = got[0].as_ref().unwrap().as_ref().unwrap();
        for (rank, g) in got.iter().enumerate() {
            let (dir, step, p) = g.as_ref().unwrap().as_ref().unwrap();
            assert_eq!((dir, *step), (&step2, 2), "rank {rank}");
            assert!(p == params, "rank {rank} loaded other weights");
        }
        assert_eq!(checkpoint::list_set_aside_corrupt(&out).unwrap().len(), 1);
        assert_eq!(checkpoint::list_complete(&out).unwrap().len(), 1);

        flip_last_byte(&step2.join(OPTIMIZER_FILE));
        let got = dist::ring::with_local_rings(3, timeout, |_, ring| {
            choose(&cfg, &table, ring, true)
                .map(|l| l.is_some())
                .map_err(|e| format!("{e:#}"))
        });
        let e = got[0].as_ref().unwrap_err();
        assert!(
            e.contains("no checkpoint") && e.contains("optimizer.safetensors"),
            "{e}"
        );
        for g in &got[1..] {
            let e = g.as_ref().unwrap_err();
            assert!(e.contains("rank 0 could not choose"), "{e}");
        }
        assert_eq!(checkpoint::list_set_aside_corrupt(&out).unwrap().len(), 2);
    }
}
