//! The caption tokenizer: a byte-level BPE held in a Hugging Face `tokenizers` pipeline, saved as
//! the `tokenizer.json` that Python's `tokenizers` reads, plus a deterministic BPE dropout for the
//! loader.
//!
//! Pipeline (what [`BpeTokenizer::train`] builds; a loaded `tokenizer.json` brings its own):
//! normaliser NFKC then lowercase, `ByteLevel` pre-tokenizer (GPT-2 split regex, a space added in
//! front of the text, every byte mapped to one printable character), a BPE model over those
//! characters with no unknown token (all 256 byte characters are in the vocabulary) and no special
//! tokens, and the `ByteLevel` decoder. The transformer pads with per-position ids `Vt + p`
//! (docs/model.md §1), outside the BPE vocabulary, so the tokenizer needs no pad or end token.
//!
//! BPE dropout (Provilkov et al. 2020) is done here, not by `tokenizers`, whose BPE `dropout`
//! draws from an unseeded thread RNG and would break bit-exact resume. [`BpeTokenizer::encode_with_dropout`]
//! normalises and pre-tokenises with the tokenizer's own components, then runs its own merge
//! loop over the model's vocabulary and ranked merges: among the adjacent pairs that have a merge,
//! the one of lowest rank (leftmost on a tie) is applied, except that each candidate is skipped
//! with probability p, drawn from the caller's `ChaCha8Rng`; skipped candidates return after the
//! next applied merge, and the word is done when every candidate was skipped. With p = 0 no draw
//! is made and the result is exactly [`BpeTokenizer::encode`]'s.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::path::{Path, PathBuf};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::{Lowercase, Sequence, NFKC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    ModelWrapper, NormalizerWrapper, OffsetReferential, OffsetType, PreTokenizedString,
    PreTokenizer, Tokenizer, TokenizerImpl,
};

/// The text vocabulary of the DALL·E paper, the default of `data-prep tokenizer train`.
pub const DEFAULT_VOCAB_SIZE: usize = 16384;

/// Characters kept of a caption quoted in an error.
const QUOTE_CHARS: usize = 80;

#[derive(Debug, thiserror::Error)]
pub enum BpeError {
    #[error("reading tokenizer {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing tokenizer {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("tokenizer {path} has a {kind} model; Tessera needs a BPE model")]
    NotBpe { path: PathBuf, kind: &'static str },
    #[error("writing tokenizer {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("serialising tokenizer: {0}")]
    Serialise(String),
    #[error("training the BPE: {0}")]
    Train(String),
    #[error("no non-empty captions to train the BPE on")]
    NoCaptions,
    #[error("vocab size {0} is below the 256 byte-level characters every BPE here starts from")]
    VocabTooSmall(usize),
    #[error("encoding caption {caption:?}: {message}")]
    Encode { caption: String, message: String },
    #[error("decoding ids: {0}")]
    Decode(String),
    #[error("BPE dropout must be in [0, 1], got {0}")]
    BadDropout(f32),
    #[error(
        "the tokenizer's vocabulary has {tokenizer} ids but the model's text_vocab is \
         {text_vocab}; use a smaller tokenizer or a larger text_vocab"
    )]
    VocabTooLarge { tokenizer: usize, text_vocab: usize },
    #[error("text_vocab {text_vocab} + text_len {text_len} padding ids do not fit in u32")]
    PaddingOverflow { text_vocab: usize, text_len: usize },
}

/// The BPE model's tables, in the form the dropout merge loop needs.
#[derive(Debug, Clone)]
struct MergeTable {
    vocab: HashMap<String, u32>,
    /// (left id, right id) → (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    unk: Option<u32>,
    fuse_unk: bool,
    byte_fallback: bool,
    ignore_merges: bool,
    continuing_subword_prefix: Option<String>,
    end_of_word_suffix: Option<String>,
}

/// A `tokenizers` pipeline with a BPE model (see the module docs).
#[derive(Clone)]
pub struct BpeTokenizer {
    inner: Tokenizer,
    table: MergeTable,
    /// One more than the largest id the tokenizer can produce.
    id_bound: usize,
}

impl std::fmt::Debug for BpeTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BpeTokenizer")
            .field("vocab_size", &self.id_bound)
            .field("merges", &self.table.merges.len())
            .finish()
    }
}

fn quote(caption: &str) -> String {
    if caption.chars().count() <= QUOTE_CHARS {
        caption.to_string()
    } else {
        let head: String = caption.chars().take(QUOTE_CHARS).collect();
        format!("{head}…")
    }
}

fn model_kind(model: &ModelWrapper) -> &'static str {
    match model {
        ModelWrapper::BPE(_) => "BPE",
        ModelWrapper::WordPiece(_) => "WordPiece",
        ModelWrapper::WordLevel(_) => "WordLevel",
        ModelWrapper::Unigram(_) => "Unigram",
    }
}

impl BpeTokenizer {
    /// Trains a byte-level BPE (NFKC + lowercase, no special tokens) on `texts`, to at most
    /// `vocab_size` ids (256 byte characters, then one per merge; fewer if the texts run out of
    /// pairs seen `min_frequency` times). Empty texts are ignored.
    pub fn train(
        texts: impl Iterator<Item = String> + Send,
        vocab_size: usize,
        min_frequency: u64,
    ) -> Result<Self, BpeError> {
        if vocab_size < 256 {
            return Err(BpeError::VocabTooSmall(vocab_size));
        }
        let normalizer: NormalizerWrapper =
            Sequence::new(vec![NFKC.into(), Lowercase.into()]).into();
        let mut tk: TokenizerImpl<
            ModelWrapper,
            NormalizerWrapper,
            tokenizers::PreTokenizerWrapper,
            tokenizers::PostProcessorWrapper,
            tokenizers::DecoderWrapper,
        > = TokenizerImpl::new(ModelWrapper::BPE(BPE::default()));
        tk.with_normalizer(Some(normalizer))
            .map_err(|e| BpeError::Train(e.to_string()))?;
        tk.with_pre_tokenizer(Some(ByteLevel::default()));
        tk.with_decoder(Some(ByteLevelDecoder::default()));
        let mut trainer: TrainerWrapper = BpeTrainer::builder()
            .vocab_size(vocab_size)
            .min_frequency(min_frequency)
            .show_progress(false)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        let seen = std::sync::atomic::AtomicUsize::new(0);
        let texts = texts.filter(|t| !t.trim().is_empty()).inspect(|_| {
            seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        });
        tk.train(&mut trainer, texts)
            .map_err(|e| BpeError::Train(e.to_string()))?;
        if seen.into_inner() == 0 {
            return Err(BpeError::NoCaptions);
        }
        // Go through the saved form, so that a trained tokenizer is exactly a loaded one.
        let json = Tokenizer::from(tk)
            .to_string(false)
            .map_err(|e| BpeError::Serialise(e.to_string()))?;
        Self::from_json(json.as_bytes(), Path::new("<trained>"))
    }

    /// Loads any `tokenizer.json` whose model is a BPE. Truncation and padding settings in the
    /// file are dropped (the caller truncates and pads), and so is the model's own unseeded
    /// `dropout`: use [`Self::encode_with_dropout`] instead.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, BpeError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| BpeError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&bytes, path)
    }

    fn from_json(bytes: &[u8], path: &Path) -> Result<Self, BpeError> {
        let parse = |message: String| BpeError::Parse {
            path: path.to_path_buf(),
            message,
        };
        let mut inner = Tokenizer::from_bytes(bytes).map_err(|e| parse(e.to_string()))?;
        let mut bpe = match inner.get_model() {
            ModelWrapper::BPE(bpe) => bpe.clone(),
            other => {
                return Err(BpeError::NotBpe {
                    path: path.to_path_buf(),
                    kind: model_kind(other),
                })
            }
        };
        if bpe.dropout.is_some() {
            bpe.dropout = None;
            inner.with_model(ModelWrapper::BPE(bpe.clone()));
        }
        inner
            .with_truncation(None)
            .map_err(|e| parse(e.to_string()))?;
        inner.with_padding(None);
        let table = MergeTable::from_bpe(&bpe).map_err(parse)?;
        let id_bound = table
            .vocab
            .values()
            .chain(inner.get_added_vocabulary().get_vocab().values())
            .map(|&id| id as usize + 1)
            .max()
            .unwrap_or(0);
        Ok(Self {
            inner,
            table,
            id_bound,
        })
    }

    /// Writes the tokenizer as `tokenizer.json` (pretty JSON) at `path`: a temporary file beside
    /// it, fsynced, then renamed over `path`.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), BpeError> {
        let path = path.as_ref();
        let json = self
            .inner
            .to_string(true)
            .map_err(|e| BpeError::Serialise(e.to_string()))?;
        crate::fsutil::write_atomic(path, json.as_bytes(), true).map_err(|e| BpeError::Write {
            path: path.to_path_buf(),
            source: e.source,
        })
    }

    /// One more than the largest id the tokenizer can produce (model vocabulary and added
    /// tokens): the smallest `text_vocab` it fits in.
    pub fn vocab_size(&self) -> usize {
        self.id_bound
    }

    /// The underlying `tokenizers` pipeline.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// The ids of `text` through the `tokenizers` pipeline (no special tokens, no truncation).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, BpeError> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| BpeError::Encode {
                caption: quote(text),
                message: e.to_string(),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// [`Self::encode`] over many texts, in parallel on rayon's pool.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>, BpeError> {
        let encs = self
            .inner
            .encode_batch_fast(texts.to_vec(), false)
            .map_err(|e| BpeError::Encode {
                caption: format!("<batch of {}>", texts.len()),
                message: e.to_string(),
            })?;
        Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// The text of `ids` through the tokenizer's decoder (byte-level: the normalised text, with
    /// the space the pre-tokenizer put in front).
    pub fn decode(&self, ids: &[u32]) -> Result<String, BpeError> {
        self.inner
            .decode(ids, false)
            .map_err(|e| BpeError::Decode(e.to_string()))
    }

    /// The ids of `text` with BPE dropout `p` (module docs): the tokenizer's own normaliser,
    /// added-token split and pre-tokenizer, then this module's merge loop. `p = 0` gives exactly
    /// [`Self::encode`] and draws nothing from `rng`.
    pub fn encode_with_dropout(
        &self,
        text: &str,
        p: f32,
        rng: &mut ChaCha8Rng,
    ) -> Result<Vec<u32>, BpeError> {
        if !(0.0..=1.0).contains(&p) {
            return Err(BpeError::BadDropout(p));
        }
        let err = |message: String| BpeError::Encode {
            caption: quote(text),
            message,
        };
        let tk = &self.inner;
        let mut pre: PreTokenizedString = tk
            .get_added_vocabulary()
            .extract_and_normalize(tk.get_normalizer(), text);
        if let Some(pt) = tk.get_pre_tokenizer() {
            pt.pre_tokenize(&mut pre).map_err(|e| err(e.to_string()))?;
        }
        let mut ids = Vec::new();
        let mut scratch = Scratch::default();
        for (piece, _, tokens) in pre.get_splits(OffsetReferential::Original, OffsetType::None) {
            match tokens {
                // An added token, already identified.
                Some(tokens) => ids.extend(tokens.iter().map(|t| t.id)),
                None => self.table.tokenize(piece, p, rng, &mut scratch, &mut ids),
            }
        }
        Ok(ids)
    }
}

impl MergeTable {
    fn from_bpe(bpe: &BPE) -> Result<Self, String> {
        let vocab: HashMap<String, u32> = bpe.get_vocab().into_iter().collect();
        // The merges are private to `tokenizers`; their serialised form lists them by rank.
        let json = serde_json::to_value(bpe).map_err(|e| e.to_string())?;
        let list = json
            .get("merges")
            .and_then(|m| m.as_array())
            .ok_or("the BPE model has no merges list")?;
        let prefix = bpe.continuing_subword_prefix.clone();
        let mut merges = HashMap::with_capacity(list.len());
        for (rank, m) in list.iter().enumerate() {
            let (a, b) = match m {
                serde_json::Value::Array(pair) if pair.len() == 2 => {
                    match (pair[0].as_str(), pair[1].as_str()) {
                        (Some(a), Some(b)) => (a.to_string(), b.to_string()),
                        _ => return Err(format!("merge {rank} is not two strings")),
                    }
                }
                serde_json::Value::String(s) => match s.split_once(' ') {
                    Some((a, b)) => (a.to_string(), b.to_string()),
                    None => return Err(format!("merge {rank} {s:?} is not two tokens")),
                },
                _ => return Err(format!("merge {rank} is neither a pair nor a string")),
            };
            let id = |t: &str| {
                vocab
                    .get(t)
                    .copied()
                    .ok_or_else(|| format!("merge {rank} uses {t:?}, not in the vocabulary"))
            };
            // With a continuing-subword prefix, the right part carries it and the merge does not.
            let b_tail = match &prefix {
                Some(pre) => b.strip_prefix(pre.as_str()).unwrap_or(&b),
                None => &b,
            };
            let merged = id(&format!("{a}{b_tail}"))?;
            merges.insert((id(&a)?, id(&b)?), (rank as u32, merged));
        }
        let unk = match &bpe.unk_token {
            Some(t) => Some(
                *vocab
                    .get(t)
                    .ok_or_else(|| format!("unk token {t:?} is not in the vocabulary"))?,
            ),
            None => None,
        };
        Ok(Self {
            vocab,
            merges,
            unk,
            fuse_unk: bpe.fuse_unk,
            byte_fallback: bpe.byte_fallback,
            ignore_merges: bpe.ignore_merges,
            continuing_subword_prefix: prefix,
            end_of_word_suffix: bpe.end_of_word_suffix.clone(),
        })
    }

    /// Appends the ids of one pre-token to `out`.
    fn tokenize(
        &self,
        word: &str,
        p: f32,
        rng: &mut ChaCha8Rng,
        s: &mut Scratch,
        out: &mut Vec<u32>,
    ) {
        if word.is_empty() {
            return;
        }
        if self.ignore_merges && p == 0.0 {
            if let Some(&id) = self.vocab.get(word) {
                out.push(id);
                return;
            }
        }
        self.initial_symbols(word, &mut s.ids);
        if s.ids.is_empty() {
            return;
        }
        self.merge(p, rng, s);
        let mut i = 0;
        while i != NIL {
            out.push(s.ids[i]);
            i = s.next[i];
        }
    }

    /// The word's characters as ids, with the model's prefix/suffix, byte fallback and unknown
    /// token rules.
    fn initial_symbols(&self, word: &str, ids: &mut Vec<u32>) {
        ids.clear();
        let n_chars = word.chars().count();
        let mut pending_unk = false;
        let mut key = String::new();
        for (k, c) in word.chars().enumerate() {
            key.clear();
            if k > 0 {
                if let Some(pre) = &self.continuing_subword_prefix {
                    key.push_str(pre);
                }
            }
            key.push(c);
            if k + 1 == n_chars {
                if let Some(suf) = &self.end_of_word_suffix {
                    key.push_str(suf);
                }
            }
            if let Some(&id) = self.vocab.get(&key) {
                ids.push(id);
                pending_unk = false;
                continue;
            }
            if self.byte_fallback {
                let bytes: Option<Vec<u32>> = key
                    .bytes()
                    .map(|b| self.vocab.get(&format!("<0x{b:02X}>")).copied())
                    .collect();
                if let Some(bytes) = bytes {
                    ids.extend(bytes);
                    pending_unk = false;
                    continue;
                }
            }
            // Without an unknown token the character is dropped, as `tokenizers` does.
            if let Some(unk) = self.unk {
                if !(self.fuse_unk && pending_unk) {
                    ids.push(unk);
                }
                pending_unk = true;
            }
        }
    }

    /// Applies merges to `s.ids` (module docs), leaving the result as a linked list from 0.
    fn merge(&self, p: f32, rng: &mut ChaCha8Rng, s: &mut Scratch) {
        let n = s.ids.len();
        s.next.clear();
        s.next.extend((1..=n).map(|i| if i == n { NIL } else { i }));
        s.prev.clear();
        s.prev
            .extend((0..n).map(|i| if i == 0 { NIL } else { i - 1 }));
        s.alive.clear();
        s.alive.resize(n, true);
        s.heap.clear();
        s.skipped.clear();
        for i in 0..n.saturating_sub(1) {
            if let Some(&(rank, _)) = self.merges.get(&(s.ids[i], s.ids[i + 1])) {
                s.heap.push(Reverse((rank, i)));
            }
        }
        while let Some(Reverse((rank, i))) = s.heap.pop() {
            // Stale candidates (a side already merged away or changed) are dropped undrawn.
            let j = s.next[i];
            if !s.alive[i] || j == NIL {
                continue;
            }
            let Some(&(r, merged)) = self.merges.get(&(s.ids[i], s.ids[j])) else {
                continue;
            };
            if r != rank {
                continue;
            }
            if p > 0.0 && rng.random::<f32>() < p {
                s.skipped.push(Reverse((rank, i)));
                continue;
            }
            s.heap.extend(s.skipped.drain(..));
            s.ids[i] = merged;
            s.alive[j] = false;
            let k = s.next[j];
            s.next[i] = k;
            if k != NIL {
                s.prev[k] = i;
                if let Some(&(r, _)) = self.merges.get(&(merged, s.ids[k])) {
                    s.heap.push(Reverse((r, i)));
                }
            }
            let h = s.prev[i];
            if h != NIL {
                if let Some(&(r, _)) = self.merges.get(&(s.ids[h], merged)) {
                    s.heap.push(Reverse((r, h)));
                }
            }
        }
    }
}

const NIL: usize = usize::MAX;

/// Reused buffers of the merge loop: symbols as a linked list over their first positions.
#[derive(Default)]
struct Scratch {
    ids: Vec<u32>,
    next: Vec<usize>,
    prev: Vec<usize>,
    alive: Vec<bool>,
    heap: BinaryHeap<Reverse<(u32, usize)>>,
    skipped: Vec<Reverse<(u32, usize)>>,
}

/// The `text_len` ids of one caption for the transformer (docs/model.md §1): its BPE ids (with
/// dropout `dropout` drawn from `rng`; none at 0), truncated to `text_len`, then the padding id
/// `text_vocab + p` at every position p after the caption. Errors if the tokenizer's ids do not
/// fit below `text_vocab`.
pub fn encode_caption(
    tok: &BpeTokenizer,
    caption: &str,
    text_len: usize,
    text_vocab: usize,
    dropout: f32,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<u32>, BpeError> {
    if tok.vocab_size() > text_vocab {
        return Err(BpeError::VocabTooLarge {
            tokenizer: tok.vocab_size(),
            text_vocab,
        });
    }
    let pad_base = u32::try_from(text_vocab)
        .ok()
        .filter(|&v| (v as u64 + text_len as u64) <= u32::MAX as u64 + 1)
        .ok_or(BpeError::PaddingOverflow {
            text_vocab,
            text_len,
        })?;
    let mut ids = if dropout == 0.0 {
        tok.encode(caption)?
    } else {
        tok.encode_with_dropout(caption, dropout, rng)?
    };
    ids.truncate(text_len);
    let n = ids.len();
    ids.extend((n..text_len).map(|p| pad_base + p as u32));
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// Shapes captions, varied in case, spacing and punctuation, deterministic in `seed`.
    fn captions(n: usize, seed: u64) -> Vec<String> {
        const SIZE: [&str; 4] = ["small", "Large", "tiny", "HUGE"];
        const COLOUR: [&str; 6] = ["red", "blue", "green", "yellow", "purple", "orange"];
        const SHAPE: [&str; 5] = ["circle", "square", "triangle", "star", "hexagon"];
        const WHERE: [&str; 4] = ["above", "below", "left of", "right of"];
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut pick = |xs: &[&'static str]| xs[rng.random_range(0..xs.len())];
        (0..n)
            .map(|i| {
                let mut c = format!(
                    "a {} {} {} {} a {} {}",
                    pick(&SIZE),
                    pick(&COLOUR),
                    pick(&SHAPE),
                    pick(&WHERE),
                    pick(&COLOUR),
                    pick(&SHAPE)
                );
                match i % 5 {
                    0 => c.push_str(" on a white background."),
                    1 => c.push_str(",  on   a black background!"),
                    2 => c = c.to_uppercase(),
                    3 => c.push_str(" (photo #12345)"),
                    _ => {}
                }
                c
            })
            .collect()
    }

    fn tricky() -> Vec<String> {
        [
            "",
            " ",
            "   leading and trailing   ",
            "repeated     spaces\tand\ttabs",
            "Café déjà vu, naïve façade",
            "ﬁne ligatures ① ² ＦＵＬＬＷＩＤＴＨ",
            "İstanbul ΣΊΣΥΦΟΣ straße",
            "日本語のキャプション、猫が座っている",
            "emoji 🐱🐶 family 👨‍👩‍👧 flags 🇫🇷",
            "punctuation!!! ??? ... --- ;;; \"quoted\" 'single' (parens) [brackets]",
            "it's they're we've I'm you'll he'd",
            "numbers 3.14159 1,000,000 2024-01-01 #42",
            "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "combining e\u{301} a\u{308} zero\u{200b}width",
            "a red circle above a blue square on a white background",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn trained(vocab: usize) -> BpeTokenizer {
        let texts = captions(400, 1).into_iter().chain(tricky());
        BpeTokenizer::train(texts, vocab, 2).expect("train")
    }

    #[test]
    fn trained_pipeline_is_lowercase_nfkc_byte_level_without_special_tokens() {
        let tok = trained(600);
        assert!(tok.vocab_size() > 256 && tok.vocab_size() <= 600);
        assert_eq!(tok.inner().get_added_vocabulary().len(), 0);
        let enc = |s| tok.encode(s).unwrap();
        assert_eq!(enc("A RED Circle"), enc("a red circle"));
        assert_eq!(enc("ﬁne ＲＥＤ"), enc("fine red"));
        // Frequent words become single tokens; byte-level covers any unseen character.
        assert_eq!(enc("circle").len(), 1);
        assert!(!enc("ꙮ unseen glyph").is_empty());
        assert_eq!(tok.decode(&enc("A Red Star")).unwrap(), " a red star");
    }

    #[test]
    fn train_rejects_empty_input_and_tiny_vocab() {
        let empty = BpeTokenizer::train(vec![String::new(), "  ".into()].into_iter(), 300, 1);
        assert!(matches!(empty, Err(BpeError::NoCaptions)), "{empty:?}");
        let tiny = BpeTokenizer::train(captions(5, 0).into_iter(), 100, 1);
        assert!(
            matches!(tiny, Err(BpeError::VocabTooSmall(100))),
            "{tiny:?}"
        );
    }

    #[test]
    fn save_load_round_trip_gives_identical_encodings() {
        let tok = trained(500);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        tok.save(&path).unwrap();
        assert!(!dir.path().join("tokenizer.json.tmp").exists());
        let back = BpeTokenizer::load(&path).unwrap();
        assert_eq!(back.vocab_size(), tok.vocab_size());
        for c in captions(200, 7).iter().chain(&tricky()) {
            assert_eq!(back.encode(c).unwrap(), tok.encode(c).unwrap(), "{c:?}");
        }
        // Saving again writes the same file.
        let again = dir.path().join("again.json");
        back.save(&again).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            std::fs::read(&again).unwrap()
        );
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.json");
        let e = BpeTokenizer::load(&missing).unwrap_err();
        assert!(matches!(e, BpeError::Read { .. }));
        assert!(e.to_string().contains("missing.json"), "{e}");

        let garbage = dir.path().join("garbage.json");
        std::fs::write(&garbage, b"{ not json").unwrap();
        let e = BpeTokenizer::load(&garbage).unwrap_err();
        assert!(matches!(e, BpeError::Parse { .. }));
        assert!(e.to_string().contains("garbage.json"), "{e}");

        let wordlevel = dir.path().join("wordlevel.json");
        std::fs::write(
            &wordlevel,
            r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
                "normalizer":null,"pre_tokenizer":null,"post_processor":null,"decoder":null,
                "model":{"type":"WordLevel","vocab":{"a":0,"[UNK]":1},"unk_token":"[UNK]"}}"#,
        )
        .unwrap();
        let e = BpeTokenizer::load(&wordlevel).unwrap_err();
        assert!(
            matches!(
                e,
                BpeError::NotBpe {
                    kind: "WordLevel",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("wordlevel.json"), "{e}");
    }

    #[test]
    fn dropout_zero_equals_encode() {
        let tok = trained(800);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut texts = captions(500, 11);
        texts.extend(tricky());
        for c in &texts {
            let want = tok.encode(c).unwrap();
            assert_eq!(
                tok.encode_with_dropout(c, 0.0, &mut rng).unwrap(),
                want,
                "{c:?}"
            );
        }
        // No draw was made at p = 0.
        assert_eq!(
            rng.get_word_pos(),
            ChaCha8Rng::seed_from_u64(3).get_word_pos()
        );
    }

    #[test]
    fn dropout_zero_equals_encode_with_added_tokens() {
        let mut tok = trained(400);
        tok.inner
            .add_tokens([tokenizers::AddedToken::from("<sep>", true)])
            .unwrap();
        let tok = BpeTokenizer::from_json(
            tok.inner.to_string(false).unwrap().as_bytes(),
            Path::new("x"),
        )
        .unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for c in ["a red <sep> blue circle", "<sep>", "x<sep>y <SEP>"] {
            let want = tok.encode(c).unwrap();
            assert!(
                want.contains(&(tok.vocab_size() as u32 - 1)),
                "{c}: {want:?}"
            );
            assert_eq!(tok.encode_with_dropout(c, 0.0, &mut rng).unwrap(), want);
        }
    }

    #[test]
    fn dropout_changes_segmentation_but_not_text_and_is_seeded() {
        let tok = trained(800);
        let texts: Vec<String> = captions(200, 5).into_iter().chain(tricky()).collect();
        let run = |seed, p| -> Vec<Vec<u32>> {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            texts
                .iter()
                .map(|c| tok.encode_with_dropout(c, p, &mut rng).unwrap())
                .collect()
        };
        let plain: Vec<Vec<u32>> = texts.iter().map(|c| tok.encode(c).unwrap()).collect();
        let dropped = run(9, 0.1);
        let changed = plain.iter().zip(&dropped).filter(|(a, b)| a != b).count();
        assert!(changed > 20, "only {changed} of {} changed", texts.len());
        for ((a, b), c) in plain.iter().zip(&dropped).zip(&texts) {
            assert_eq!(tok.decode(b).unwrap(), tok.decode(a).unwrap(), "{c:?}");
        }
        assert_eq!(run(9, 0.1), dropped);
        assert_ne!(run(10, 0.1), dropped);
        // p = 1 applies no merge at all: one id per byte.
        let bytes = run(1, 1.0);
        for (c, ids) in texts.iter().zip(&bytes) {
            let normalised = tok.decode(ids).unwrap();
            assert_eq!(ids.len(), normalised.len(), "{c:?}");
        }
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for p in [-0.1, 1.5, f32::NAN] {
            let e = tok.encode_with_dropout("a", p, &mut rng);
            assert!(matches!(e, Err(BpeError::BadDropout(_))), "{p}: {e:?}");
        }
    }

    #[test]
    fn encode_caption_pads_truncates_and_checks_the_vocabulary() {
        let tok = trained(400);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let vt = 512;
        let caption = "a small red circle above a blue square";
        let plain = tok.encode(caption).unwrap();
        assert!(plain.len() > 3 && plain.len() < 16);

        let ids = encode_caption(&tok, caption, 16, vt, 0.0, &mut rng).unwrap();
        assert_eq!(ids.len(), 16);
        assert_eq!(&ids[..plain.len()], &plain[..]);
        for (p, &id) in ids.iter().enumerate().skip(plain.len()) {
            assert_eq!(id as usize, vt + p);
        }

        let short = encode_caption(&tok, caption, 3, vt, 0.0, &mut rng).unwrap();
        assert_eq!(short, plain[..3]);
        assert!(encode_caption(&tok, caption, 0, vt, 0.0, &mut rng)
            .unwrap()
            .is_empty());
        let empty = encode_caption(&tok, "", 4, vt, 0.0, &mut rng).unwrap();
        assert_eq!(empty, [512, 513, 514, 515]);

        let dropped = encode_caption(&tok, caption, 64, vt, 0.5, &mut rng).unwrap();
        assert_eq!(dropped.len(), 64);
        let n = dropped.iter().take_while(|&&id| (id as usize) < vt).count();
        assert!(n > plain.len());
        assert_eq!(
            tok.decode(&dropped[..n]).unwrap(),
            tok.decode(&plain).unwrap()
        );
        assert!((n..64).all(|p| dropped[p] as usize == vt + p));

        let small = tok.vocab_size() - 1;
        let e = encode_caption(&tok, caption, 16, small, 0.0, &mut rng).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(&tok.vocab_size().to_string()) && msg.contains(&small.to_string()));
        assert!(encode_caption(&tok, caption, 16, tok.vocab_size(), 0.0, &mut rng).is_ok());
    }
}
