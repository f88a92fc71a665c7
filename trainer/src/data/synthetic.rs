//! A synthetic captioned-grid dataset: token sequences with the structure of real DALL·E data
//! (a caption that describes the image, an image whose tokens depend on the caption and on their
//! neighbours), so that training on it shows the loss falling, cheaply and deterministically.
//!
//! Sample `i` of seed `s` comes from a ChaCha8 stream (seed `s` ⊕ 0x5eedda7a, stream `i`), so any sample can
//! be generated on its own: the data cursor is just the index of the next sample.
//!
//! Caption grammar (word ids are caption tokens, laid out in consecutive ranges of the text
//! vocabulary): `SIZE COLOUR SHAPE [RELATION SIZE COLOUR SHAPE]`, cut to a random length in
//! [min_caption_tokens, max_caption_tokens]; the remaining positions hold the padding token of
//! their position, Vt + p. With 4 sizes, 8 colours, 8 shapes and 4 relations the caption uses
//! the first 24 ids of the text vocabulary (fewer if Vt is smaller: ids wrap modulo Vt).
//!
//! Image: a G×G grid of a background token (one per first colour) with, for each described
//! object, a square of side `size + 1` (clipped to the grid) at a random position, filled with
//! the token `(colour·8 + shape)·4 + k mod Vi`, where k ∈ 0..4 follows a fixed 2×2 texture
//! inside the square. Five per cent of the cells are replaced by a uniformly random token.

use super::Batch;
use crate::config::{DataSource, RunConfig, SyntheticConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SIZES: u32 = 4;
const COLOURS: u32 = 8;
const SHAPES: u32 = 8;
const RELATIONS: u32 = 4;
const NOISE: f64 = 0.05;
/// Keeps the data's random stream apart from the weight initialisation of the same `run.seed`.
const SEED_SALT: u64 = 0x5eed_da7a;

/// The generator's parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyntheticData {
    pub seed: u64,
    pub text_len: usize,
    pub text_vocab: usize,
    pub grid: usize,
    pub image_vocab: usize,
    pub min_caption_tokens: usize,
    pub max_caption_tokens: usize,
}

impl SyntheticData {
    /// The generator of a run config, seeded from `run.seed`: the `data:` section's caption
    /// lengths with `data.source: synthetic`, the defaults otherwise (`data-prep synth-tokens`
    /// writes shards for a `data.source: shards` config).
    /// An error when the config's model is not a transformer.
    pub fn from_config(cfg: &RunConfig) -> Result<Self, crate::config::ConfigError> {
        let default = SyntheticConfig::default();
        let s = match &cfg.data {
            DataSource::Synthetic(s) => s,
            _ => &default,
        };
        let m = cfg.transformer()?;
        Ok(SyntheticData {
            seed: cfg.run.seed,
            text_len: m.text_len,
            text_vocab: m.text_vocab,
            grid: m.grid,
            image_vocab: m.image_vocab,
            min_caption_tokens: s.min_caption_tokens,
            max_caption_tokens: s.max_caption_tokens(m.text_len),
        })
    }

    /// Writes sample `index` into `text` [Tt] and `image` [G²].
    pub fn sample(&self, index: u64, text: &mut [u32], image: &mut [u32]) {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ SEED_SALT);
        rng.set_stream(index);
        let (vt, tt, g) = (self.text_vocab as u32, self.text_len, self.grid);
        let objects = 1 + rng.random_range(0..2u32) as usize;
        let mut words = Vec::with_capacity(7);
        let mut props = Vec::with_capacity(2);
        for o in 0..objects {
            if o > 0 {
                words.push(SIZES + COLOURS + SHAPES + rng.random_range(0..RELATIONS));
            }
            let (size, colour, shape) = (
                rng.random_range(0..SIZES),
                rng.random_range(0..COLOURS),
                rng.random_range(0..SHAPES),
            );
            words.extend([size, SIZES + colour, SIZES + COLOURS + shape]);
            props.push((size, colour, shape));
        }
        let hi = self.max_caption_tokens.min(tt).max(1);
        let lo = self.min_caption_tokens.clamp(1, hi);
        let len = rng.random_range(lo..=hi);
        for (p, slot) in text.iter_mut().enumerate().take(tt) {
            *slot = if p < len.min(words.len()) {
                words[p] % vt
            } else {
                vt + p as u32
            };
        }
        let vi = self.image_vocab as u32;
        let background = (COLOURS * SHAPES * 4 + props[0].1) % vi;
        image.fill(background);
        for &(size, colour, shape) in &props {
            let side = (size as usize + 1).min(g);
            let r0 = rng.random_range(0..=g - side);
            let c0 = rng.random_range(0..=g - side);
            for r in r0..r0 + side {
                for c in c0..c0 + side {
                    let k = ((r - r0) % 2 * 2 + (c - c0) % 2) as u32;
                    image[r * g + c] = ((colour * SHAPES + shape) * 4 + k) % vi;
                }
            }
        }
        for cell in image.iter_mut() {
            if rng.random_bool(NOISE) {
                *cell = rng.random_range(0..vi);
            }
        }
    }

    /// Samples `first .. first + batch` as one batch.
    pub fn batch(&self, first: u64, batch: usize) -> Batch {
        let (tt, gi) = (self.text_len, self.grid * self.grid);
        let mut text = vec![0; batch * tt];
        let mut image = vec![0; batch * gi];
        for b in 0..batch {
            self.sample(
                first + b as u64,
                &mut text[b * tt..(b + 1) * tt],
                &mut image[b * gi..(b + 1) * gi],
            );
        }
        Batch { batch, text, image }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gen() -> SyntheticData {
        SyntheticData {
            seed: 3,
            text_len: 10,
            text_vocab: 100,
            grid: 6,
            image_vocab: 300,
            min_caption_tokens: 3,
            max_caption_tokens: 10,
        }
    }

    #[test]
    fn samples_are_deterministic_independent_and_in_range() {
        let g = gen();
        let a = g.batch(5, 4);
        let b = g.batch(5, 4);
        assert_eq!(a, b);
        // Sample 6 alone equals the second row of the batch that starts at 5.
        let one = g.batch(6, 1);
        assert_eq!(one.text[..], a.text[10..20]);
        assert_eq!(one.image[..], a.image[36..72]);
        assert_ne!(g.batch(0, 4), a);
        for (p, &t) in a.text.iter().enumerate() {
            assert!((t as usize) < 100 + 10);
            // Padding ids carry their own position.
            if t >= 100 {
                assert_eq!(t as usize, 100 + p % 10);
            }
        }
        assert!(a.image.iter().all(|&t| t < 300));
    }

    #[test]
    fn captions_describe_the_image() {
        // The first object's texture shows in the image unless the second object covers it or
        // noise hides it, which happens to a few samples only.
        let g = gen();
        let shown = (0..40)
            .filter(|&i| {
                let s = g.batch(i, 1);
                let (colour, shape) = (s.text[1] - SIZES, s.text[2] - SIZES - COLOURS);
                let first = (colour * SHAPES + shape) * 4;
                s.image.iter().any(|&t| t >= first && t < first + 4)
            })
            .count();
        assert!(
            shown >= 30,
            "the described object appears in only {shown} of 40 samples"
        );
    }
}
