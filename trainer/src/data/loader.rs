//! The shard loader: batches for one rank of a data-parallel run, read from shards and prepared
//! ahead on a background thread. The machinery (order, rank slices, cursor, prefetch thread,
//! recycling, shutdown) is generic over a [`RecordSet`]: the token shards' [`ShardSet`] here, and
//! the image shards' `ImageShardSet` in [`super::image_loader`]. The text below describes the
//! token set; the image set differs only in its epoch order (a two-level chunk/record shuffle).
//!
//! Order. All records of all shards (in sorted path order) form one global index 0..N. Epoch `e`
//! visits them in the order of a permutation that is a pure function of (seed, e): a ChaCha8
//! Fisher–Yates shuffle ([`epoch_permutation`]). An epoch is cut into ⌊N / (B·W)⌋ global batches
//! of B·W records (B = batch size per rank, W = world size; the last N mod B·W records of an
//! epoch's order are not visited in that epoch). Rank r takes positions r·B .. (r+1)·B of each
//! global batch, so the ranks' slices are disjoint and their union is the global batch: one rank
//! with batch 2B sees exactly what two ranks with batch B see together.
//!
//! Cursor. [`Cursor`] `{epoch, position}` is where the next global batch starts in the epoch's
//! order. [`Loader::cursor`] is the cursor after the last batch handed out (not after the batches
//! prefetched), so a checkpoint that saves it resumes exactly where training stopped.
//!
//! Reading. For token shards the ids go from the memory map to the batch in one widening pass
//! that also checks their ranges ([`TokenShard::read_tokens`]), and the records of the next
//! batch are hinted into cache meanwhile; the caption is read only for BPE dropout.
//!
//! Prefetch. The background thread fills batches into recycled buffers and hands them over in
//! parcels of consecutive batches (about [`PARCEL_BYTES`] of buffers each), every batch paired
//! with the cursor after it; [`Loader::next_batch`] still hands out one batch at a time, and the
//! cursor it leaves names the next batch training takes, however far the thread has read.
//!
//! Verification. A [`ShardSet`] opened with [`ShardSet::verify_on_first_use`] (`data.verify`,
//! the default) checks each shard's record and caption CRC-32s the first time this rank reads
//! it: a thread of its own verifies the shards in path order from the moment the loader starts,
//! and the thread that fills batches verifies a shard itself when it needs one that no thread
//! has started on (or waits for the one that has). The guarantee: no batch holding a record of
//! a shard is handed to training before that shard's checksums have passed; once a check fails,
//! no further batch is prepared, and after the batches already prepared (from shards that
//! passed) training receives the error, naming the shard and the section whose checksum failed,
//! whether or not the shard's records were next. The ids of every record are checked
//! as they are read in any case, so `data.verify: false` (trusted data) only skips the
//! checksums, which are what catch a flipped id that is still in range.
//!
//! BPE dropout. With `bpe_dropout` > 0 each record's caption is re-encoded at load time through a
//! [`CaptionEncoder`] instead of using the stored text tokens; the encoder's random stream is a
//! pure function of (seed, epoch, global record index) ([`dropout_rng`]), so resume stays
//! bit-exact whatever the thread timing.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use formats::image_shard::ImageShardError;
use formats::token_shard::{
    check_tokens, RecordView, ShardError, ShardLayout, TokenShard, EXTENSION,
};

use super::Batch;

/// Keeps the shuffle's random stream apart from the other streams of the same `run.seed`.
const SHUFFLE_SALT: u64 = 0x5bf1_e0c4_da7a_0001;
/// Keeps the BPE-dropout streams apart from the others.
const DROPOUT_SALT: u64 = 0xb9e0_d409_0075_0002;

/// What an encoder returns on failure: any error, carried as its message chain.
pub type EncodeError = Box<dyn std::error::Error + Send + Sync>;

/// Re-encodes a caption into Tt text ids (padded with Vt + p), with BPE dropout drawn from `rng`.
/// The tokenizer module implements it over `bpe::encode_caption`.
pub trait CaptionEncoder: Send + Sync {
    fn encode(&self, caption: &str, rng: &mut ChaCha8Rng) -> Result<Vec<u32>, EncodeError>;
}

/// Everything that can go wrong finding, opening or reading shards.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("data.paths pattern '{pattern}' is not a valid glob: {message}")]
    BadPattern { pattern: String, message: String },
    #[error("data.paths pattern '{pattern}' matches no .{extension} shard")]
    NoMatch {
        pattern: String,
        extension: &'static str,
    },
    #[error("reading the matches of data.paths pattern '{pattern}': {message}")]
    Glob { pattern: String, message: String },
    #[error(transparent)]
    Shard(#[from] ShardError),
    /// A shard failed the checksum check of its first use (shared by every batch that asks).
    #[error(transparent)]
    Unverified(Arc<ShardError>),
    #[error(transparent)]
    Image(#[from] ImageShardError),
    #[error(
        "the shards hold {records} records, more than the loader's limit of {}",
        u32::MAX
    )]
    TooManyRecords { records: u64 },
    #[error(
        "the shards hold {records} records, fewer than one global batch of {global} \
         (train.batch_size {batch} × {world} ranks)"
    )]
    TooFewRecords {
        records: u64,
        global: u64,
        batch: usize,
        world: usize,
    },
    #[error("rank {rank} is outside a world of size {world}")]
    BadRank { rank: usize, world: usize },
    #[error("batch size must be ≥ 1 and prefetch depth ≥ 1")]
    BadOptions,
    #[error("the image loader's shuffle window must hold at least 1 chunk")]
    BadShuffleWindow,
    #[error(
        "data.bpe_dropout = {0} needs a caption encoder (the tokenizer of data.tokenizer), and \
         none was given to the loader"
    )]
    NoEncoder(f32),
    #[error("shard {}, record {record}: re-encoding the caption: {message}", path.display())]
    Encode {
        path: PathBuf,
        record: u64,
        message: String,
    },
    #[error("the loader's background thread stopped unexpectedly")]
    Stopped,
}

/// Expands `patterns` with `glob`: each must match at least one `.tts` file (other matches, such
/// as `<name>.tts.tmp` left by an interrupted write or `.done` markers, are ignored). The result
/// is sorted and de-duplicated.
pub fn resolve_paths(patterns: &[String]) -> Result<Vec<PathBuf>, LoaderError> {
    resolve_paths_with(patterns, EXTENSION)
}

/// [`resolve_paths`] for files named `*.<extension>` (e.g. `tis` for image shards).
pub fn resolve_paths_with(
    patterns: &[String],
    extension: &'static str,
) -> Result<Vec<PathBuf>, LoaderError> {
    let mut all = Vec::new();
    for pattern in patterns {
        let entries = glob::glob(pattern).map_err(|e| LoaderError::BadPattern {
            pattern: pattern.clone(),
            message: e.to_string(),
        })?;
        let mut found = 0;
        for entry in entries {
            let path = entry.map_err(|e| LoaderError::Glob {
                pattern: pattern.clone(),
                message: e.to_string(),
            })?;
            if path.extension().and_then(|e| e.to_str()) == Some(extension) && path.is_file() {
                all.push(path);
                found += 1;
            }
        }
        if found == 0 {
            return Err(LoaderError::NoMatch {
                pattern: pattern.clone(),
                extension,
            });
        }
    }
    all.sort();
    all.dedup();
    Ok(all)
}

/// Token shards opened together, with one global record index over all of them.
#[derive(Debug)]
pub struct ShardSet {
    shards: Vec<TokenShard>,
    /// `starts[k]` is the global index of shard k's first record; `starts[len]` the total.
    starts: Vec<u64>,
    layout: ShardLayout,
    /// The shards' checksum checks, when verified on first use.
    checks: Option<Checks>,
}

/// Where one shard's checksum check stands.
#[derive(Debug, Clone)]
enum Check {
    Pending,
    Running,
    Passed,
    Failed(Arc<ShardError>),
}

/// The checksum checks of a set's shards, shared by the verifying thread and the reader.
#[derive(Debug)]
struct Checks {
    /// Per shard: passed (the reader's fast path, read without the lock).
    passed: Vec<AtomicBool>,
    state: Mutex<Vec<Check>>,
    changed: Condvar,
    /// Some check failed.
    failed: AtomicBool,
    /// The loader is going away: checks stop between pieces.
    cancel: AtomicBool,
}

impl ShardSet {
    /// Opens every shard (header checks) and checks that each has the layout `expected`.
    pub fn open(paths: &[PathBuf], expected: &ShardLayout) -> Result<ShardSet, LoaderError> {
        let mut shards = Vec::with_capacity(paths.len());
        let mut starts = vec![0u64];
        let mut total = 0u64;
        for path in paths {
            let shard = TokenShard::open(path)?;
            shard.check_layout(expected)?;
            total += shard.len();
            starts.push(total);
            shards.push(shard);
        }
        if total > u32::MAX as u64 {
            return Err(LoaderError::TooManyRecords { records: total });
        }
        Ok(ShardSet {
            shards,
            starts,
            layout: *expected,
            checks: None,
        })
    }

    /// Checks every shard's record and caption checksums before the first of its records is
    /// read (`data.verify`): see the module docs for the guarantee. A set is verified for the
    /// one loader it is given to.
    pub fn verify_on_first_use(mut self) -> ShardSet {
        let n = self.shards.len();
        self.checks = Some(Checks {
            passed: (0..n).map(|_| AtomicBool::new(false)).collect(),
            state: Mutex::new(vec![Check::Pending; n]),
            changed: Condvar::new(),
            failed: AtomicBool::new(false),
            cancel: AtomicBool::new(false),
        });
        self
    }

    /// Whether shard `k`'s checksums have passed (always true without verification).
    pub fn is_verified(&self, k: usize) -> bool {
        self.checks
            .as_ref()
            .is_none_or(|c| c.passed[k].load(Ordering::Acquire))
    }

    /// Returns once shard `k`'s checksums have passed: checks them on this thread when no
    /// thread has started on them, waits when one has. Errors when they fail (or the set is
    /// being dropped).
    fn ensure_verified(&self, k: usize) -> Result<(), LoaderError> {
        let Some(c) = &self.checks else {
            return Ok(());
        };
        if c.passed[k].load(Ordering::Acquire) {
            return Ok(());
        }
        let lock = || c.state.lock().map_err(|_| LoaderError::Stopped);
        let mut state = lock()?;
        loop {
            if c.cancel.load(Ordering::Relaxed) {
                return Err(LoaderError::Stopped);
            }
            match &state[k] {
                Check::Passed => return Ok(()),
                Check::Failed(e) => return Err(LoaderError::Unverified(e.clone())),
                Check::Running => {
                    state = c.changed.wait(state).map_err(|_| LoaderError::Stopped)?;
                }
                Check::Pending => {
                    state[k] = Check::Running;
                    drop(state);
                    self.run_check(c, k);
                    state = lock()?;
                }
            }
        }
    }

    /// Checks shard `k` (claimed as running by the caller) and records the outcome.
    fn run_check(&self, c: &Checks, k: usize) {
        let outcome = self.shards[k].verify_checksums_until(&|| c.cancel.load(Ordering::Relaxed));
        let Ok(mut state) = c.state.lock() else {
            return;
        };
        state[k] = match outcome {
            Some(Ok(())) => {
                c.passed[k].store(true, Ordering::Release);
                Check::Passed
            }
            Some(Err(e)) => {
                // Reported once, by the batch that stops training.
                c.failed.store(true, Ordering::Release);
                Check::Failed(Arc::new(e))
            }
            None => Check::Pending,
        };
        c.changed.notify_all();
    }

    /// The first failed check, if any has failed.
    fn first_failure(&self) -> Option<Arc<ShardError>> {
        let c = self.checks.as_ref()?;
        if !c.failed.load(Ordering::Acquire) {
            return None;
        }
        let state = c.state.lock().ok()?;
        state.iter().find_map(|s| match s {
            Check::Failed(e) => Some(e.clone()),
            _ => None,
        })
    }

    /// Checks every shard no thread has started on, in path order, until all are done, one
    /// fails, or [`RecordSet::stop_background`] is called. Run by the loader's verifying thread.
    pub fn verify_all(&self) {
        let Some(c) = &self.checks else {
            return;
        };
        for k in 0..self.shards.len() {
            if c.cancel.load(Ordering::Relaxed) || c.failed.load(Ordering::Acquire) {
                return;
            }
            let claimed = match c.state.lock() {
                Ok(mut state) if matches!(state[k], Check::Pending) => {
                    state[k] = Check::Running;
                    true
                }
                Ok(_) => false,
                Err(_) => return,
            };
            if claimed {
                self.run_check(c, k);
            }
        }
    }

    /// Resolves `patterns` ([`resolve_paths`]) and opens the shards.
    pub fn open_patterns(
        patterns: &[String],
        expected: &ShardLayout,
    ) -> Result<ShardSet, LoaderError> {
        Self::open(&resolve_paths(patterns)?, expected)
    }

    /// Records over all shards, N.
    pub fn len(&self) -> u64 {
        self.starts[self.shards.len()]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn layout(&self) -> ShardLayout {
        self.layout
    }

    pub fn shards(&self) -> &[TokenShard] {
        &self.shards
    }

    /// The shard and local index of global record `g` (< N).
    pub fn locate(&self, g: u64) -> (usize, u64) {
        // The last start ≤ g; shards are never empty, so it is unique.
        let k = self.starts.partition_point(|&s| s <= g) - 1;
        (k, g - self.starts[k])
    }

    /// Global record `g`, and the shard it lives in.
    pub fn record(&self, g: u64) -> Result<(RecordView<'_>, &TokenShard), ShardError> {
        let (k, i) = self.locate(g);
        let shard = &self.shards[k];
        Ok((shard.record(i)?, shard))
    }
}

/// The visiting order of epoch `epoch`: a permutation of 0..n, a pure function of (seed, epoch).
pub fn epoch_permutation(seed: u64, epoch: u64, n: u32) -> Vec<u32> {
    let mut rng = epoch_rng(seed, SHUFFLE_SALT, epoch);
    let mut order: Vec<u32> = (0..n).collect();
    shuffle(&mut rng, &mut order);
    order
}

/// The random stream of one epoch's order: ChaCha8 seeded by `seed ^ salt`, stream `epoch`.
pub(crate) fn epoch_rng(seed: u64, salt: u64, epoch: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ salt);
    rng.set_stream(epoch);
    rng
}

/// Fisher–Yates shuffle of `items` in place, drawing from `rng` (the last index first).
pub(crate) fn shuffle(rng: &mut ChaCha8Rng, items: &mut [u32]) {
    for i in (1..items.len()).rev() {
        let j = rng.random_range(0..=i as u32) as usize;
        items.swap(i, j);
    }
}

/// A set of records with one global index 0..N that can fill a batch from a list of global
/// indices: what the loader's machinery needs to know about a kind of shard.
pub trait RecordSet: Send + Sync + 'static {
    /// One rank's batch of these records.
    type Batch: Send + 'static;
    /// Per-reader mutable state (caches, encoders), owned by the thread that fills batches.
    type State: Send + 'static;

    /// Records over all shards, N (≤ `u32::MAX`).
    fn records(&self) -> u64;

    /// The visiting order of `epoch`: a permutation of 0..N, a pure function of (seed, epoch).
    fn epoch_order(&self, seed: u64, epoch: u64) -> Vec<u32>;

    /// A batch with no buffers yet, to be filled by [`RecordSet::fill`].
    fn empty_batch(&self) -> Self::Batch;

    /// Bytes of the buffers of one batch of `batch_size` records: sizes the parcels in which
    /// the prefetch thread hands batches over ([`PARCEL_BYTES`]).
    fn batch_bytes(&self, batch_size: usize) -> usize;

    /// A hint that the records `indices` will be read next: a set whose records are scattered
    /// in memory can start fetching them while the current batch is filled. Does nothing by
    /// default.
    fn prefetch(&self, _indices: &[u32]) {}

    /// Work the loader runs on a thread of its own beside the one that fills batches (token
    /// shards: their checksum checks), or `None` (the default).
    fn background(self: Arc<Self>) -> Option<Box<dyn FnOnce() + Send>> {
        None
    }

    /// Asks the work of [`RecordSet::background`], and any thread waiting on it, to stop soon:
    /// the loader is being dropped.
    fn stop_background(&self) {}

    /// Fills `batch` with the records `indices` (global, in row order) of `epoch`, reusing its
    /// buffers; every element is overwritten.
    fn fill(
        &self,
        state: &mut Self::State,
        opts: &LoaderOptions,
        epoch: u64,
        indices: &[u32],
        batch: &mut Self::Batch,
    ) -> Result<(), LoaderError>;
}

/// The token reader's state: the caption encoder used for BPE dropout.
#[derive(Clone)]
pub struct TokenState {
    encoder: Option<Arc<dyn CaptionEncoder>>,
}

impl RecordSet for ShardSet {
    type Batch = Batch;
    type State = TokenState;

    fn records(&self) -> u64 {
        self.len()
    }

    fn epoch_order(&self, seed: u64, epoch: u64) -> Vec<u32> {
        epoch_permutation(seed, epoch, self.len() as u32)
    }

    fn empty_batch(&self) -> Batch {
        Batch {
            batch: 0,
            text: Vec::new(),
            image: Vec::new(),
        }
    }

    fn batch_bytes(&self, batch_size: usize) -> usize {
        let l = self.layout();
        batch_size * (l.text_len + l.image_tokens) as usize * std::mem::size_of::<u32>()
    }

    fn prefetch(&self, indices: &[u32]) {
        for &g in indices {
            let (k, local) = self.locate(g as u64);
            self.shards[k].prefetch_tokens(local);
        }
    }

    fn background(self: Arc<Self>) -> Option<Box<dyn FnOnce() + Send>> {
        self.checks.as_ref()?;
        Some(Box::new(move || self.verify_all()))
    }

    fn stop_background(&self) {
        if let Some(c) = &self.checks {
            c.cancel.store(true, Ordering::Relaxed);
            // Under the lock, so that a thread between its check of `cancel` and its wait
            // cannot miss the wake-up.
            let _state = c.state.lock();
            c.changed.notify_all();
        }
    }

    fn fill(
        &self,
        state: &mut TokenState,
        opts: &LoaderOptions,
        epoch: u64,
        indices: &[u32],
        batch: &mut Batch,
    ) -> Result<(), LoaderError> {
        if let Some(e) = self.first_failure() {
            return Err(LoaderError::Unverified(e));
        }
        let layout = self.layout();
        let (tt, gi) = (layout.text_len as usize, layout.image_tokens as usize);
        let b = indices.len();
        batch.batch = b;
        // Every entry is overwritten below; resizing only zero-fills a new buffer once.
        batch.text.resize(b * tt, 0);
        batch.image.resize(b * gi, 0);
        let rows = batch
            .text
            .chunks_exact_mut(tt)
            .zip(batch.image.chunks_exact_mut(gi));
        for (&g, (text_row, image_row)) in indices.iter().zip(rows) {
            let (k, local) = self.locate(g as u64);
            self.ensure_verified(k)?;
            let shard = &self.shards[k];
            // Ids widened and range-checked straight from the map into the batch; the caption
            // is only read (and checked) when BPE dropout re-encodes it.
            shard.read_tokens(local, text_row, image_row)?;
            if let (Some(encoder), true) = (&state.encoder, opts.bpe_dropout > 0.0) {
                let caption = shard.record(local)?.caption;
                let mut rng = dropout_rng(opts.seed, epoch, g as u64);
                let encode_err = |message: String| LoaderError::Encode {
                    path: shard.path().to_path_buf(),
                    record: local,
                    message,
                };
                let ids = encoder
                    .encode(caption, &mut rng)
                    .map_err(|e| encode_err(format!("{e}")))?;
                check_tokens(&layout, &ids, image_row).map_err(encode_err)?;
                text_row.copy_from_slice(&ids);
            }
        }
        Ok(())
    }
}

/// The BPE-dropout random stream of one record in one epoch: ChaCha8 keyed by
/// (seed, epoch, global record index, salt), so it depends on nothing else.
pub fn dropout_rng(seed: u64, epoch: u64, record: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    for (k, v) in [seed, epoch, record, DROPOUT_SALT].into_iter().enumerate() {
        key[8 * k..8 * k + 8].copy_from_slice(&v.to_le_bytes());
    }
    ChaCha8Rng::from_seed(key)
}

/// Where the next global batch starts: the epoch, and the position in that epoch's order.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Cursor {
    pub epoch: u64,
    pub position: u64,
}

impl Cursor {
    /// The cursor of the next global batch of `global` records over `n` records: the following
    /// position, or the start of the next epoch when a whole batch no longer fits.
    pub fn advance(self, global: u64, n: u64) -> Cursor {
        Cursor {
            epoch: self.epoch,
            position: self.position + global,
        }
        .normalise(global, n)
    }

    /// Moves a cursor whose batch would not fit in the epoch to the next epoch's start.
    pub fn normalise(self, global: u64, n: u64) -> Cursor {
        if self.position + global > n {
            Cursor {
                epoch: self.epoch + 1,
                position: 0,
            }
        } else {
            self
        }
    }
}

/// How one rank reads: its place in the world, its batch, and load-time options.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoaderOptions {
    /// `run.seed`.
    pub seed: u64,
    /// Records per batch on this rank, B.
    pub batch_size: usize,
    pub rank: usize,
    pub world_size: usize,
    /// Batches prepared ahead, at least (whole parcels of them, [`PARCEL_BYTES`]). ≥ 1.
    pub prefetch: usize,
    /// BPE dropout probability; > 0 re-encodes captions through the [`CaptionEncoder`].
    pub bpe_dropout: f32,
}

impl LoaderOptions {
    /// Records per global batch, B·W.
    pub fn global_batch(&self) -> u64 {
        (self.batch_size * self.world_size) as u64
    }
}

/// The synchronous part of the loader: turns a cursor into this rank's batch. Cheap to clone;
/// the background thread owns one.
pub struct BatchReader<S: RecordSet = ShardSet> {
    set: Arc<S>,
    opts: LoaderOptions,
    state: S::State,
    /// The order of `order_epoch`, computed when the epoch changes.
    order: Vec<u32>,
    order_epoch: Option<u64>,
}

impl<S: RecordSet> Clone for BatchReader<S>
where
    S::State: Clone,
{
    fn clone(&self) -> Self {
        BatchReader {
            set: self.set.clone(),
            opts: self.opts,
            state: self.state.clone(),
            order: self.order.clone(),
            order_epoch: self.order_epoch,
        }
    }
}

impl BatchReader<ShardSet> {
    /// Checks the options against the data (rank, batch sizes, encoder present when needed).
    pub fn new(
        set: Arc<ShardSet>,
        opts: LoaderOptions,
        encoder: Option<Arc<dyn CaptionEncoder>>,
    ) -> Result<Self, LoaderError> {
        if opts.bpe_dropout > 0.0 && encoder.is_none() {
            check_options(set.len(), &opts)?;
            return Err(LoaderError::NoEncoder(opts.bpe_dropout));
        }
        BatchReader::with_state(set, opts, TokenState { encoder })
    }
}

/// Checks `opts` against a set of `records` records.
fn check_options(records: u64, opts: &LoaderOptions) -> Result<(), LoaderError> {
    if opts.batch_size == 0 || opts.prefetch == 0 || opts.world_size == 0 {
        return Err(LoaderError::BadOptions);
    }
    if opts.rank >= opts.world_size {
        return Err(LoaderError::BadRank {
            rank: opts.rank,
            world: opts.world_size,
        });
    }
    if records > u32::MAX as u64 {
        return Err(LoaderError::TooManyRecords { records });
    }
    if opts.global_batch() > records {
        return Err(LoaderError::TooFewRecords {
            records,
            global: opts.global_batch(),
            batch: opts.batch_size,
            world: opts.world_size,
        });
    }
    Ok(())
}

impl<S: RecordSet> BatchReader<S> {
    /// A reader of `set` with the reader state `state`; checks the options against the data
    /// (rank, batch and prefetch sizes, at least one global batch of records).
    pub fn with_state(
        set: Arc<S>,
        opts: LoaderOptions,
        state: S::State,
    ) -> Result<Self, LoaderError> {
        check_options(set.records(), &opts)?;
        Ok(BatchReader {
            set,
            opts,
            state,
            order: Vec::new(),
            order_epoch: None,
        })
    }

    /// Records over all shards.
    pub fn records(&self) -> u64 {
        self.set.records()
    }

    /// The options this reader was made with.
    pub fn options(&self) -> &LoaderOptions {
        &self.opts
    }

    /// The reader's state (for instance the image reader's chunk cache).
    pub fn state(&self) -> &S::State {
        &self.state
    }

    /// The global record indices of this rank's slice of the global batch at `cursor` (which
    /// must be normalised: a whole global batch fits from its position).
    pub fn indices(&mut self, cursor: Cursor) -> &[u32] {
        if self.order_epoch != Some(cursor.epoch) {
            self.order = self.set.epoch_order(self.opts.seed, cursor.epoch);
            self.order_epoch = Some(cursor.epoch);
        }
        let b = self.opts.batch_size;
        let start = cursor.position as usize + self.opts.rank * b;
        &self.order[start..start + b]
    }

    /// This rank's batch at `cursor` (normalised).
    pub fn read(&mut self, cursor: Cursor) -> Result<S::Batch, LoaderError> {
        let mut batch = self.set.empty_batch();
        self.read_into(cursor, &mut batch)?;
        Ok(batch)
    }

    /// [`BatchReader::read`] into `batch`, reusing its buffers.
    pub fn read_into(&mut self, cursor: Cursor, batch: &mut S::Batch) -> Result<(), LoaderError> {
        self.indices(cursor);
        let b = self.opts.batch_size;
        let start = cursor.position as usize + self.opts.rank * b;
        // The records of this rank's next batch (when it is in the same epoch) start coming in
        // from memory while this one is filled: the epoch's order scatters them over the shards.
        let ahead = start + self.opts.global_batch() as usize;
        if let Some(next) = self.order.get(ahead..ahead + b) {
            self.set.prefetch(next);
        }
        let indices = &self.order[start..start + b];
        self.set
            .fill(&mut self.state, &self.opts, cursor.epoch, indices, batch)
    }
}

/// The prefetch thread hands batches over in parcels of about this many bytes of batch buffers
/// (at least one batch, at most [`MAX_PARCEL_BATCHES`]): one channel message, and at most one
/// wake-up of a waiting thread, per parcel instead of per batch. Small batches (the paper's
/// transformer: 2 records of 1,280 ids, 10 KiB) would otherwise spend more time being handed
/// over than being read.
pub const PARCEL_BYTES: usize = 64 << 10;
/// The most batches in one parcel (bounds the latency of the first batch for tiny batches).
pub const MAX_PARCEL_BATCHES: usize = 64;
/// The channel holds at least this many bytes of parcels (and at least `prefetch` batches), so
/// that the producer keeps working while the training thread is being woken; small enough that
/// the batches in flight stay in a core's L2 cache. Large batches (images) are not affected:
/// for them the channel holds `prefetch` batches, one a parcel.
pub const AHEAD_BYTES: usize = 256 << 10;
/// The most parcels [`AHEAD_BYTES`] asks the channel to hold (tiny batches).
pub const MAX_AHEAD_PARCELS: usize = 8;

/// Consecutive batches, each with the cursor of the batch after it, in order.
type Parcel<B> = Vec<(B, Cursor)>;
type Message<B> = Result<Parcel<B>, LoaderError>;

/// Batches for one rank, prepared by a background thread at least `prefetch` batches ahead.
/// Dropping the loader stops and joins the thread.
///
/// The thread hands batches over in parcels of `parcel_len` consecutive batches ([`PARCEL_BYTES`]);
/// the channel holds max(⌈prefetch / parcel_len⌉, min([`AHEAD_BYTES`] / parcel bytes,
/// [`MAX_AHEAD_PARCELS`])) parcels ([`Loader::read_ahead_limit`] bounds what is read ahead). Each
/// batch travels with the cursor after it, and [`Loader::next_batch`] hands out one batch at a
/// time, so [`Loader::cursor`] names the next batch training takes however far the thread has
/// read. Memory: at most (channel capacity + 2) parcels of batches exist at once (in the
/// channel, being filled, being handed out, recycled): with the default prefetch, at most
/// 256 KiB + 2 parcels (≤ 384 KiB) for batches of up to 64 KiB, and prefetch + 2 batches (as
/// without parcels) for batches over 128 KiB.
pub struct Loader<S: RecordSet = ShardSet> {
    rx: Option<Receiver<Message<S::Batch>>>,
    /// The rest of the last parcel received, handed out one batch at a time.
    ready: std::vec::IntoIter<(S::Batch, Cursor)>,
    /// Spent batches going back to the producer, whose buffers it refills.
    recycle: Sender<S::Batch>,
    handle: Option<JoinHandle<()>>,
    /// The thread of [`RecordSet::background`], when the set has such work.
    background: Option<JoinHandle<()>>,
    set: Arc<S>,
    stop: Arc<AtomicBool>,
    cursor: Cursor,
    records: u64,
    global: u64,
    parcel_len: usize,
    /// The channel's capacity, in parcels.
    parcels: usize,
}

impl Loader<ShardSet> {
    /// Starts reading at `start` (a cursor saved by [`Loader::cursor`], or the default for a
    /// fresh run).
    pub fn new(
        set: Arc<ShardSet>,
        opts: LoaderOptions,
        start: Cursor,
        encoder: Option<Arc<dyn CaptionEncoder>>,
    ) -> Result<Loader, LoaderError> {
        Loader::from_reader(BatchReader::new(set, opts, encoder)?, start)
    }
}

impl<S: RecordSet> Loader<S> {
    /// Starts `reader` on a background thread at `start` (a cursor saved by [`Loader::cursor`],
    /// or the default for a fresh run).
    pub fn from_reader(mut reader: BatchReader<S>, start: Cursor) -> Result<Self, LoaderError> {
        let opts = reader.opts;
        let (records, global) = (reader.records(), opts.global_batch());
        let start = start.normalise(global, records);
        let batch_bytes = reader.set.batch_bytes(opts.batch_size).max(1);
        let parcel_len = (PARCEL_BYTES / batch_bytes).clamp(1, MAX_PARCEL_BATCHES);
        // At least `prefetch` batches and about AHEAD_BYTES of them: while the training thread
        // wakes up (tens of µs on a virtual machine) the producer keeps filling.
        let parcels = opts
            .prefetch
            .div_ceil(parcel_len)
            .max((AHEAD_BYTES / (parcel_len * batch_bytes)).min(MAX_AHEAD_PARCELS));
        let (tx, rx) = crossbeam_channel::bounded(parcels);
        // Room for every batch that can be in flight, so that none is dropped and reallocated.
        let (recycle, spent) = crossbeam_channel::bounded((parcels + 2) * parcel_len);
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let set = reader.set.clone();
        let background = match set.clone().background() {
            Some(work) => Some(
                std::thread::Builder::new()
                    .name(format!("verify-rank{}", opts.rank))
                    .spawn(work)
                    .map_err(|_| LoaderError::Stopped)?,
            ),
            None => None,
        };
        let handle = std::thread::Builder::new()
            .name(format!("loader-rank{}", opts.rank))
            .spawn(move || {
                produce(
                    &mut reader,
                    start,
                    (global, records, parcel_len),
                    (&tx, &spent),
                    &thread_stop,
                )
            })
            .map_err(|_| LoaderError::Stopped)?;
        Ok(Loader {
            rx: Some(rx),
            ready: Vec::new().into_iter(),
            recycle,
            handle: Some(handle),
            background,
            set,
            stop,
            cursor: start,
            records,
            global,
            parcel_len,
            parcels,
        })
    }

    /// The next batch of this rank; after it, [`Loader::cursor`] points past it.
    pub fn next_batch(&mut self) -> Result<S::Batch, LoaderError> {
        loop {
            if let Some((batch, next)) = self.ready.next() {
                self.cursor = next;
                return Ok(batch);
            }
            let rx = self.rx.as_ref().ok_or(LoaderError::Stopped)?;
            match rx.recv() {
                Ok(Ok(parcel)) => self.ready = parcel.into_iter(),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(LoaderError::Stopped),
            }
        }
    }

    /// Hands a batch that is no longer needed back to the producer, which refills its buffers
    /// instead of allocating new ones. Optional; a batch that is not returned is simply dropped.
    pub fn recycle(&self, batch: S::Batch) {
        let _ = self.recycle.try_send(batch);
    }

    /// Where the batch after the last one returned starts.
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// Records over all shards.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Records per global batch, B·W.
    pub fn global_batch(&self) -> u64 {
        self.global
    }

    /// Batches per parcel handed over by the prefetch thread.
    pub fn parcel_len(&self) -> usize {
        self.parcel_len
    }

    /// The most batches the thread can have read beyond the last one handed out: the parcels
    /// in the channel, the one it is filling, and the rest of the one being handed out.
    pub fn read_ahead_limit(&self) -> usize {
        (self.parcels + 2) * self.parcel_len
    }
}

fn produce<S: RecordSet>(
    reader: &mut BatchReader<S>,
    mut cursor: Cursor,
    (global, records, parcel_len): (u64, u64, usize),
    (tx, spent): (&Sender<Message<S::Batch>>, &Receiver<S::Batch>),
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::Relaxed) {
        let mut parcel = Vec::with_capacity(parcel_len);
        while parcel.len() < parcel_len {
            let mut batch = spent
                .try_recv()
                .unwrap_or_else(|_| reader.set.empty_batch());
            if let Err(e) = reader.read_into(cursor, &mut batch) {
                // The batches before the failing one still reach training, then the error.
                if !parcel.is_empty() {
                    let _ = tx.send(Ok(parcel));
                }
                let _ = tx.send(Err(e));
                return;
            }
            cursor = cursor.advance(global, records);
            parcel.push((batch, cursor));
        }
        // A closed channel means the loader was dropped.
        if tx.send(Ok(parcel)).is_err() {
            return;
        }
    }
}

impl<S: RecordSet> Drop for Loader<S> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.set.stop_background();
        // Dropping the receiver wakes a producer blocked on a full channel.
        self.rx = None;
        for h in [self.handle.take(), self.background.take()]
            .into_iter()
            .flatten()
        {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use formats::token_shard::{tmp_path, TokenShardWriter};
    use std::path::Path;

    fn layout() -> ShardLayout {
        ShardLayout {
            text_len: 3,
            image_tokens: 4,
            text_vocab: 50,
            image_vocab: 1000,
        }
    }

    /// Shards whose record with global index g has image tokens [g, g, g, g] (g mod 1000) and
    /// caption "r{g}".
    fn write_shards(dir: &Path, sizes: &[u32]) -> Vec<PathBuf> {
        let mut g = 0;
        let mut paths = Vec::new();
        for (k, &n) in sizes.iter().enumerate() {
            let path = dir.join(format!("s-{k:02}.tts"));
            let mut w = TokenShardWriter::create(&path, layout()).unwrap();
            for _ in 0..n {
                w.push(&[g % 50, 51, 52], &[g % 1000; 4], &format!("r{g}"))
                    .unwrap();
                g += 1;
            }
            paths.push(w.finish().unwrap());
        }
        paths
    }

    fn opts(batch_size: usize, rank: usize, world_size: usize) -> LoaderOptions {
        LoaderOptions {
            seed: 11,
            batch_size,
            rank,
            world_size,
            prefetch: 2,
            bpe_dropout: 0.0,
        }
    }

    fn ids(b: &Batch) -> Vec<u32> {
        b.image.chunks(4).map(|c| c[0]).collect()
    }

    #[test]
    fn permutation_is_a_pure_function_of_seed_and_epoch() {
        let p = epoch_permutation(3, 0, 100);
        let mut sorted = p.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(p, epoch_permutation(3, 0, 100));
        assert_ne!(p, epoch_permutation(3, 1, 100));
        assert_ne!(p, epoch_permutation(4, 0, 100));
        assert_ne!(p, sorted);
    }

    #[test]
    fn global_index_spans_shards_in_path_order() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_shards(dir.path(), &[3, 1, 4]);
        let set = ShardSet::open(&paths, &layout()).unwrap();
        assert_eq!(set.len(), 8);
        assert_eq!(set.locate(0), (0, 0));
        assert_eq!(set.locate(3), (1, 0));
        assert_eq!(set.locate(7), (2, 3));
        for g in 0..8 {
            let (r, _) = set.record(g).unwrap();
            assert_eq!(r.caption, format!("r{g}"));
            assert_eq!(r.image.to_vec(), vec![g as u32; 4]);
        }
    }

    #[test]
    fn an_epoch_visits_each_record_at_most_once_and_then_reshuffles() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_shards(dir.path(), &[5, 6]);
        let set = Arc::new(ShardSet::open(&paths, &layout()).unwrap());
        let mut l = Loader::new(set, opts(3, 0, 1), Cursor::default(), None).unwrap();
        // 11 records, batches of 3: 3 batches per epoch, 2 records left out.
        let mut epoch0 = Vec::new();
        for _ in 0..3 {
            epoch0.extend(ids(&l.next_batch().unwrap()));
        }
        assert_eq!(
            l.cursor(),
            Cursor {
                epoch: 1,
                position: 0
            }
        );
        let mut seen = epoch0.clone();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 9);
        let expected: Vec<u32> = epoch_permutation(11, 0, 11)[..9].to_vec();
        assert_eq!(epoch0, expected);
        let b = l.next_batch().unwrap();
        assert_eq!(ids(&b), epoch_permutation(11, 1, 11)[..3].to_vec());
        assert_eq!(
            l.cursor(),
            Cursor {
                epoch: 1,
                position: 3
            }
        );
        // Text tokens come back as stored.
        assert_eq!(b.text[1..3], [51, 52]);
    }

    #[test]
    fn resuming_from_a_cursor_continues_the_same_stream() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_shards(dir.path(), &[7, 6]);
        let set = Arc::new(ShardSet::open(&paths, &layout()).unwrap());
        let mut straight =
            Loader::new(set.clone(), opts(2, 0, 1), Cursor::default(), None).unwrap();
        // Tiny batches: the thread reads a whole parcel (several epochs of 6 batches) ahead.
        assert_eq!(straight.parcel_len(), MAX_PARCEL_BATCHES);
        let all: Vec<Batch> = (0..40).map(|_| straight.next_batch().unwrap()).collect();
        // Stop after every count of batches, inside a parcel and across epoch ends.
        for taken in [1, 5, 6, 7, 8, 23] {
            let mut first =
                Loader::new(set.clone(), opts(2, 0, 1), Cursor::default(), None).unwrap();
            for b in &all[..taken] {
                let got = first.next_batch().unwrap();
                assert_eq!(&got, b);
                first.recycle(got);
            }
            let expected = (0..taken).fold(Cursor::default(), |c, _| c.advance(2, 13));
            assert_eq!(first.cursor(), expected, "after {taken} batches");
            if taken == 8 {
                // 13 records, 6 batches of 2 an epoch: batch 8 ends at record 4 of epoch 1.
                assert_eq!(
                    first.cursor(),
                    Cursor {
                        epoch: 1,
                        position: 4
                    }
                );
            }
            let saved = first.cursor();
            drop(first); // with batches still prefetched: the shutdown must not hang
            let mut resumed = Loader::new(set.clone(), opts(2, 0, 1), saved, None).unwrap();
            for (i, b) in all[taken..].iter().enumerate() {
                assert_eq!(&resumed.next_batch().unwrap(), b, "batch {}", taken + i);
            }
        }
    }

    #[test]
    fn parcels_hold_several_small_batches_and_one_large_one() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_shards(dir.path(), &[1200, 1300]);
        let set = Arc::new(ShardSet::open(&paths, &layout()).unwrap());
        assert_eq!(set.batch_bytes(1), 7 * 4);
        // 28 bytes a batch: as many batches as a parcel may hold, and the most parcels.
        let l = Loader::new(set.clone(), opts(1, 0, 1), Cursor::default(), None).unwrap();
        assert_eq!(l.parcel_len(), MAX_PARCEL_BATCHES);
        assert_eq!(
            l.read_ahead_limit(),
            (MAX_AHEAD_PARCELS + 2) * MAX_PARCEL_BATCHES
        );
        // 1,200 records a rank, 33,600 bytes a batch: one batch a parcel, 7 parcels ahead.
        let mut l = Loader::new(set.clone(), opts(1200, 0, 2), Cursor::default(), None).unwrap();
        assert_eq!((l.parcel_len(), l.read_ahead_limit()), (1, 7 + 2));
        let mut r = BatchReader::new(set, opts(1200, 0, 2), None).unwrap();
        let mut cursor = Cursor::default();
        for _ in 0..3 {
            assert_eq!(l.next_batch().unwrap(), r.read(cursor).unwrap());
            cursor = cursor.advance(2400, 2500);
            assert_eq!(l.cursor(), cursor);
        }
    }

    /// Overwrites image id `j` of record `i` of a shard written by `write_shards` (2-byte ids).
    fn corrupt_image_id(path: &Path, i: usize, j: usize, id: u16) {
        let mut bytes = std::fs::read(path).unwrap();
        let at = 80 + i * layout().record_size() + (3 + j) * 2;
        bytes[at..at + 2].copy_from_slice(&id.to_le_bytes());
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn a_corrupt_token_stops_the_loader_with_its_shard_and_record_named() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_shards(dir.path(), &[5, 6]);
        corrupt_image_id(&paths[1], 2, 1, 1000); // global record 7; Vi = 1000
        let set = Arc::new(ShardSet::open(&paths, &layout()).unwrap());
        let order = epoch_permutation(11, 0, 11);
        let bad = order.iter().position(|&g| g == 7).unwrap();
        let mut l = Loader::new(set, opts(1, 0, 1), Cursor::default(), None).unwrap();
        // The batches before the bad record arrive, in order, although read in the same parcel.
        for &g in &order[..bad] {
            assert_eq!(ids(&l.next_batch().unwrap()), vec![g]);
        }
        let e = l.next_batch().unwrap_err().to_string();
        assert!(
            e.ends_with("s-01.tts, record 2: image token 1 is 1000, outside [0, Vi = 1000)"),
            "{e}"
        );
        assert_eq!(
            l.cursor(),
            Cursor {
                epoch: 0,
                position: bad as u64
            }
        );
        assert!(matches!(l.next_batch(), Err(LoaderError::Stopped)));
    }

    #[test]
    fn a_flipped_valid_id_is_caught_by_the_first_use_check_before_its_shard_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_shards(dir.path(), &[5, 6]);
        // Global record 7's first image id, 7, becomes 8: still in range.
        corrupt_image_id(&paths[1], 2, 0, 8);
        let order = epoch_permutation(11, 0, 11);

        // Without the check the flipped id trains silently.
        let set = Arc::new(ShardSet::open(&paths, &layout()).unwrap());
        let mut l = Loader::new(set, opts(1, 0, 1), Cursor::default(), None).unwrap();
        let seen: Vec<Vec<u32>> = (0..11).map(|_| ids(&l.next_batch().unwrap())).collect();
        let at = order.iter().position(|&g| g == 7).unwrap();
        assert_eq!(seen[at], [8]);

        // With it, no record of the bad shard (global 5..11) is ever handed out, and the error
        // names the shard and the section.
        let set = ShardSet::open(&paths, &layout()).unwrap();
        let set = Arc::new(set.verify_on_first_use());
        let mut l = Loader::new(set.clone(), opts(1, 0, 1), Cursor::default(), None).unwrap();
        let mut handed = Vec::new();
        let e = loop {
            match l.next_batch() {
                Ok(b) => handed.extend(ids(&b)),
                Err(e) => break e,
            }
            assert!(handed.len() <= 11, "no error within an epoch: {handed:?}");
        };
        assert!(handed.iter().all(|&g| g < 5), "{handed:?}");
        assert_eq!(handed, order[..handed.len()]);
        let e = e.to_string();
        assert!(
            e.contains("s-01.tts") && e.contains("records checksum mismatch"),
            "{e}"
        );
        assert!(set.is_verified(0) || handed.is_empty());
        assert!(!set.is_verified(1));
        drop(l);

        // Intact shards pass: every record comes through, each shard verified.
        std::fs::create_dir(dir.path().join("good")).unwrap();
        let good = write_shards(&dir.path().join("good"), &[5, 6]);
        let set = Arc::new(
            ShardSet::open(&good, &layout())
                .unwrap()
                .verify_on_first_use(),
        );
        let mut l = Loader::new(set.clone(), opts(1, 0, 1), Cursor::default(), None).unwrap();
        let mut all: Vec<u32> = (0..11)
            .flat_map(|_| ids(&l.next_batch().unwrap()))
            .collect();
        all.sort();
        assert_eq!(all, (0..11).collect::<Vec<u32>>());
        assert!(set.is_verified(0) && set.is_verified(1));
    }

    #[test]
    fn too_few_records_and_bad_ranks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_shards(dir.path(), &[3]);
        let set = Arc::new(ShardSet::open(&paths, &layout()).unwrap());
        let e = Loader::new(set.clone(), opts(2, 0, 2), Cursor::default(), None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("3 records, fewer than one global batch of 4"),
            "{e}"
        );
        let e = Loader::new(set, opts(1, 2, 2), Cursor::default(), None)
            .err()
            .unwrap();
        assert!(e
            .to_string()
            .contains("rank 2 is outside a world of size 2"));
    }

    #[test]
    fn globs_are_sorted_and_temporary_files_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_shards(dir.path(), &[2, 2]);
        // A crash mid-write leaves only `<name>.tts.tmp`; it is never read.
        let crashed = tmp_path(&dir.path().join("s-02.tts"));
        std::fs::write(&crashed, b"TESSTOK\0half").unwrap();
        std::fs::write(dir.path().join("s-00.tts.done"), b"{}").unwrap();
        let pattern = format!("{}/s-*", dir.path().display());
        let found = resolve_paths(&[pattern.clone(), paths[1].display().to_string()]).unwrap();
        assert_eq!(found, paths);
        let only_tmp = format!("{}/s-02*", dir.path().display());
        let e = resolve_paths(std::slice::from_ref(&only_tmp))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!("data.paths pattern '{only_tmp}' matches no .tts shard")
        );
        let e = resolve_paths(&["[".to_string()]).unwrap_err().to_string();
        assert!(e.contains("'[' is not a valid glob"), "{e}");
    }

    struct Upper;

    /// A stand-in encoder: one "token" per caption byte drawn with the rng, then padding.
    impl CaptionEncoder for Upper {
        fn encode(&self, caption: &str, rng: &mut ChaCha8Rng) -> Result<Vec<u32>, EncodeError> {
            if caption == "r3" {
                return Err("cannot encode r3".into());
            }
            let first = caption.len() as u32 + rng.random_range(0..10u32);
            Ok(vec![first, 51, 52])
        }
    }

    #[test]
    fn dropout_uses_the_encoder_with_a_per_record_stream() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_shards(dir.path(), &[5]);
        let set = Arc::new(ShardSet::open(&paths, &layout()).unwrap());
        let o = LoaderOptions {
            bpe_dropout: 0.1,
            ..opts(1, 0, 1)
        };
        let e = Loader::new(set.clone(), o, Cursor::default(), None)
            .err()
            .unwrap();
        assert!(e.to_string().contains("needs a caption encoder"), "{e}");
        let enc: Arc<dyn CaptionEncoder> = Arc::new(Upper);
        let mut r = BatchReader::new(set.clone(), o, Some(enc.clone())).unwrap();
        let at = Cursor {
            epoch: 2,
            position: 1,
        };
        let g = r.indices(at)[0] as u64;
        let b = r.read(at).unwrap();
        let mut rng = dropout_rng(11, 2, g);
        assert_eq!(b.text, vec![2 + rng.random_range(0..10u32), 51, 52]);
        assert_eq!(b, r.read(at).unwrap());
        // Errors from the encoder name the shard and record.
        let mut r = BatchReader::new(set, LoaderOptions { batch_size: 5, ..o }, Some(enc)).unwrap();
        let e = r.read(Cursor::default()).unwrap_err().to_string();
        assert!(
            e.contains("s-00.tts, record 3: re-encoding the caption: cannot encode r3"),
            "{e}"
        );
    }
}
