//! Text in the pictures the trainer draws (`trainer plot`'s labels, the captions of sample
//! grids) needs a TrueType font, found at run time: `TESSERA_FONT` names one (set but empty: no
//! font), else a common sans face in the usual system folders, else any `.ttf` there. Without one
//! the pictures are drawn without text and the caller warns once.
//!
//! [`Captioner`] writes a caption into a white band above a grid's row, in black, wrapped at
//! word boundaries to the band's width.

use std::path::{Path, PathBuf};

use ab_glyph::{point, Font, FontVec, PxScale, ScaleFont};
use anyhow::{Context, Result};

/// The environment variable that names the font.
pub const FONT_VAR: &str = "TESSERA_FONT";

/// The font to draw text with: `TESSERA_FONT` (empty: none), else a common sans face in the
/// usual system folders, else any `.ttf` there.
pub fn find() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(FONT_VAR) {
        return (!p.is_empty()).then(|| PathBuf::from(p));
    }
    let roots = [
        "/usr/share/fonts",
        "/usr/local/share/fonts",
        "/Library/Fonts",
        "/System/Library/Fonts",
    ];
    let found: Vec<PathBuf> = roots
        .iter()
        .flat_map(|r| walkdir::WalkDir::new(r).max_depth(4).into_iter().flatten())
        .map(|e| e.into_path())
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("ttf")))
        .collect();
    let preferred = [
        "DejaVuSans.ttf",
        "LiberationSans-Regular.ttf",
        "Arial.ttf",
        "FreeSans.ttf",
    ];
    preferred
        .iter()
        .find_map(|name| {
            found
                .iter()
                .find(|p| p.file_name().is_some_and(|n| n == *name))
        })
        .or_else(|| found.first())
        .cloned()
}

/// Caption text height in pixels.
const CAPTION_PX: f32 = 14.0;
/// Pixels between the band's edges and its text.
const MARGIN: u32 = 4;

/// Draws captions with one font.
pub struct Captioner {
    font: FontVec,
    /// The font file.
    pub path: PathBuf,
}

impl Captioner {
    /// The captioner of the font [`find`] finds; `None`, after one warning naming `what` (the
    /// pictures that go without captions), when there is none. A font that cannot be read or
    /// parsed is an error naming it.
    pub fn open(what: &str) -> Result<Option<Self>> {
        match find() {
            Some(path) => Self::from_file(&path).map(Some),
            None => {
                tracing::warn!(
                    "no TrueType font found (set {FONT_VAR} to a .ttf file): {what} without captions"
                );
                Ok(None)
            }
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("reading the font {} ({FONT_VAR})", path.display()))?;
        let font = FontVec::try_from_vec(bytes)
            .map_err(|_| anyhow::anyhow!("{}: not a usable TrueType font", path.display()))?;
        Ok(Captioner {
            font,
            path: path.to_path_buf(),
        })
    }

    /// `text` split into lines no wider than `width` pixels, at spaces (a word wider than the
    /// line is cut where the band ends).
    fn wrap(&self, text: &str, width: f32) -> Vec<String> {
        let scaled = self.font.as_scaled(PxScale::from(CAPTION_PX));
        let measure = |s: &str| {
            let mut w = 0.0;
            let mut prev = None;
            for c in s.chars() {
                let id = scaled.glyph_id(c);
                if let Some(p) = prev {
                    w += scaled.kern(p, id);
                }
                w += scaled.h_advance(id);
                prev = Some(id);
            }
            w
        };
        let mut lines: Vec<String> = Vec::new();
        let mut line = String::new();
        for word in text.split_whitespace() {
            let candidate = match line.is_empty() {
                true => word.to_string(),
                false => format!("{line} {word}"),
            };
            if measure(&candidate) <= width || line.is_empty() {
                line = candidate;
            } else {
                lines.push(std::mem::replace(&mut line, word.to_string()));
            }
        }
        if !line.is_empty() {
            lines.push(line);
        }
        lines
    }

    /// A white band `width` pixels wide holding `text` in black (wrapped), with a margin below
    /// the last line. An empty caption is a band of one line's height.
    pub fn band(&self, text: &str, width: u32) -> image::RgbImage {
        let scaled = self.font.as_scaled(PxScale::from(CAPTION_PX));
        let line_h = (scaled.ascent() - scaled.descent() + scaled.line_gap()).ceil() as u32;
        let inner = width.saturating_sub(2 * MARGIN) as f32;
        let lines = self.wrap(text, inner);
        let height = line_h * (lines.len().max(1) as u32) + MARGIN;
        let mut img = image::RgbImage::from_pixel(width, height, image::Rgb([255; 3]));
        for (i, line) in lines.iter().enumerate() {
            let baseline = i as f32 * line_h as f32 + scaled.ascent();
            let mut x = MARGIN as f32;
            let mut prev = None;
            for c in line.chars() {
                let id = scaled.glyph_id(c);
                if let Some(p) = prev {
                    x += scaled.kern(p, id);
                }
                let glyph = id.with_scale_and_position(CAPTION_PX, point(x, baseline));
                x += scaled.h_advance(id);
                prev = Some(id);
                let Some(outline) = self.font.outline_glyph(glyph) else {
                    continue;
                };
                let b = outline.px_bounds();
                outline.draw(|gx, gy, coverage| {
                    let (px, py) = (b.min.x as i64 + gx as i64, b.min.y as i64 + gy as i64);
                    if (0..width as i64 - MARGIN as i64).contains(&px)
                        && (0..height as i64).contains(&py)
                    {
                        let v = (255.0 * (1.0 - coverage.clamp(0.0, 1.0))).round() as u8;
                        let p = img.get_pixel_mut(px as u32, py as u32);
                        p.0 = p.0.map(|old| old.min(v));
                    }
                });
            }
        }
        img
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With a font at hand: a caption puts dark pixels in its band, a longer caption wraps onto
    /// more lines of the same width, and the margins stay white.
    #[test]
    fn a_caption_is_drawn_and_wrapped() {
        let Some(path) = find() else {
            eprintln!("note: no TrueType font on this machine; caption drawing not checked");
            assert!(
                std::env::var_os("CI").is_none(),
                "CI needs a font (fonts-dejavu-core) to check captions"
            );
            return;
        };
        let c = Captioner::from_file(&path).unwrap();
        let one = c.band("a red circle", 200);
        let dark = |img: &image::RgbImage| img.pixels().filter(|p| p.0[0] < 128).count();
        assert!(dark(&one) > 20, "{} dark pixels", dark(&one));
        let long = c.band(&"a small blue square above a red circle ".repeat(4), 200);
        assert_eq!(long.width(), 200);
        assert!(
            long.height() >= 3 * (one.height() - MARGIN),
            "{}",
            long.height()
        );
        for img in [&one, &long] {
            for y in 0..img.height() {
                assert_eq!(img.get_pixel(0, y).0, [255; 3]);
                assert_eq!(img.get_pixel(img.width() - 1, y).0, [255; 3]);
            }
        }
        let bad = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(bad.path(), b"not a font").unwrap();
        let e = format!("{:#}", Captioner::from_file(bad.path()).err().unwrap());
        assert!(e.contains("not a usable TrueType font"), "{e}");
    }
}
