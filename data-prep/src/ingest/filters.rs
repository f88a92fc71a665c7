//! The per-input work of `data-prep ingest`, run in parallel: read, check the caption, decode,
//! check the image's shape, resize and hash. Each rejection carries a [`Reason`] and a detail.
//!
//! Checks run cheapest first: caption rules, then the image header (aspect ratio, shorter side)
//! before the full decode. Duplicates are found later, in input order, by the caller
//! ([`Accepted::hash`]).

use std::io::Cursor;

use regex::Regex;

use super::resize::resize_center_crop;
use super::sources::InputItem;
use super::stats::Reason;

/// Default boilerplate patterns (case-insensitive), matched against the normalised caption.
pub const DEFAULT_REJECT_PATTERNS: [&str; 5] = [
    r"(?i)^(an? )?(image|photo|picture|img|untitled|null|none|n/?a|no caption)\.?$",
    r"(?i)stock (photo|image|picture|footage)",
    r"(?i)^untitled\b",
    r"(?i)^(img|dsc|dscn|dcim|pxl|image|photo)[ _-]?\d+(\.\w{3,4})?$",
    r"(?i)^\S+\.(jpe?g|png|webp|gif|bmp|tiff?|heic)$",
];

/// Allowed aspect ratios (width / height), inclusive.
pub const MIN_ASPECT: f64 = 0.5;
pub const MAX_ASPECT: f64 = 2.0;

/// The filter settings.
#[derive(Debug)]
pub struct Filters {
    pub resolution: u32,
    pub min_side: u32,
    pub min_caption_chars: usize,
    pub max_caption_chars: usize,
    pub patterns: Vec<Regex>,
}

/// An input that passed every per-input check.
#[derive(Debug)]
pub struct Accepted {
    pub name: String,
    /// `[res, res, 3]` RGB.
    pub pixels: Vec<u8>,
    pub caption: String,
    /// JSON: `{"key": name, "url": …}`.
    pub meta: String,
    /// xxh3-128 of `pixels`.
    pub hash: u128,
}

/// An input that did not.
#[derive(Debug)]
pub struct Rejected {
    pub name: String,
    pub reason: Reason,
    pub detail: String,
}

/// Hash of a record's (resized) pixels, the duplicate key.
pub fn pixel_hash(pixels: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(pixels)
}

/// Whitespace runs (newlines included) become one space; leading and trailing space is removed.
pub fn normalise_caption(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl Filters {
    /// Checks a caption; `Ok` is the normalised caption.
    pub fn caption(&self, bytes: Vec<u8>) -> Result<String, (Reason, String)> {
        let text = String::from_utf8(bytes)
            .map_err(|e| (Reason::NonUtf8Caption, format!("invalid UTF-8: {e}")))?;
        let caption = normalise_caption(&text);
        let n = caption.chars().count();
        if n < self.min_caption_chars {
            return Err((
                Reason::CaptionTooShort,
                format!("{n} characters < {}", self.min_caption_chars),
            ));
        }
        if n > self.max_caption_chars {
            return Err((
                Reason::CaptionTooLong,
                format!("{n} characters > {}", self.max_caption_chars),
            ));
        }
        if let Some(p) = self.patterns.iter().find(|p| p.is_match(&caption)) {
            return Err((
                Reason::BoilerplateCaption,
                format!("{caption:?} matches {}", p.as_str()),
            ));
        }
        Ok(caption)
    }

    /// Decodes, checks and resizes an image; `Ok` is `[res, res, 3]` RGB.
    pub fn image(&self, bytes: &[u8]) -> Result<Vec<u8>, (Reason, String)> {
        let undecodable = |e: String| (Reason::UndecodableImage, e);
        if bytes.is_empty() {
            return Err(undecodable("zero-byte file".into()));
        }
        let reader = || {
            image::ImageReader::new(Cursor::new(bytes))
                .with_guessed_format()
                .map_err(|e| undecodable(e.to_string()))
        };
        let (w, h) = reader()?
            .into_dimensions()
            .map_err(|e| undecodable(e.to_string()))?;
        if w == 0 || h == 0 {
            return Err(undecodable(format!("{w}x{h} image")));
        }
        let aspect = w as f64 / h as f64;
        if !(MIN_ASPECT..=MAX_ASPECT).contains(&aspect) {
            return Err((
                Reason::AspectRatio,
                format!("{w}x{h} (aspect {aspect:.3} outside [{MIN_ASPECT}, {MAX_ASPECT}])"),
            ));
        }
        if w.min(h) < self.min_side {
            return Err((
                Reason::TooSmall,
                format!("{w}x{h}, shorter side < {}", self.min_side),
            ));
        }
        let rgb = reader()?
            .decode()
            .map_err(|e| undecodable(e.to_string()))?
            .into_rgb8();
        resize_center_crop(rgb.as_raw(), w, h, self.resolution).map_err(undecodable)
    }

    /// Runs every per-input check on `item`.
    pub fn process(&self, item: InputItem) -> Result<Accepted, Rejected> {
        let name = item.name;
        let reject = |(reason, detail): (Reason, String)| Rejected {
            name: name.clone(),
            reason,
            detail,
        };
        if let Some(r) = item.reject {
            return Err(reject(r));
        }
        let caption = match item.caption.load() {
            Ok(Some(b)) => b,
            Ok(None) => return Err(reject((Reason::MissingCaption, "no caption".into()))),
            Err(e) => return Err(reject((Reason::Unreadable, format!("caption: {e}")))),
        };
        let caption = self.caption(caption).map_err(reject)?;
        let image = match item.image.load() {
            Ok(Some(b)) => b,
            Ok(None) => return Err(reject((Reason::MissingImage, "no image".into()))),
            Err(e) => return Err(reject((Reason::Unreadable, format!("image: {e}")))),
        };
        let pixels = self.image(&image).map_err(reject)?;
        // The sidecar is informational: an unreadable one only loses the url.
        let url = item
            .sidecar
            .load()
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v.get("url").and_then(|u| u.as_str()).map(String::from));
        let mut meta = serde_json::Map::new();
        meta.insert("key".into(), name.clone().into());
        if let Some(url) = url {
            meta.insert("url".into(), url.into());
        }
        Ok(Accepted {
            hash: pixel_hash(&pixels),
            name,
            pixels,
            caption,
            meta: serde_json::Value::Object(meta).to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filters() -> Filters {
        Filters {
            resolution: 8,
            min_side: 8,
            min_caption_chars: 3,
            max_caption_chars: 20,
            patterns: DEFAULT_REJECT_PATTERNS
                .iter()
                .map(|p| Regex::new(p).unwrap())
                .collect(),
        }
    }

    #[test]
    fn caption_rules() {
        let f = filters();
        assert_eq!(
            f.caption(b"  a red\n circle ".to_vec()).unwrap(),
            "a red circle"
        );
        let reason = |s: &[u8]| f.caption(s.to_vec()).unwrap_err().0;
        assert_eq!(reason(b"ab"), Reason::CaptionTooShort);
        assert_eq!(reason(&[b'x'; 21]), Reason::CaptionTooLong);
        assert_eq!(reason(b"\xff\xfe caption"), Reason::NonUtf8Caption);
        for b in [
            "image",
            "Image.",
            "Untitled 3",
            "IMG_1234.jpg",
            "DSC0042",
            "cat stock photo",
            "holiday.png",
        ] {
            assert_eq!(reason(b.as_bytes()), Reason::BoilerplateCaption, "{b}");
        }
        // Characters, not bytes: 20 two-byte characters pass.
        assert!(f.caption("é".repeat(20).into_bytes()).is_ok());
    }

    #[test]
    fn image_rules() {
        let f = filters();
        let png = |w: u32, h: u32| {
            let mut out = Vec::new();
            image::RgbImage::from_pixel(w, h, image::Rgb([9, 8, 7]))
                .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
                .unwrap();
            out
        };
        assert_eq!(f.image(&[]).unwrap_err().0, Reason::UndecodableImage);
        assert_eq!(
            f.image(b"not an image").unwrap_err().0,
            Reason::UndecodableImage
        );
        let mut cut = png(16, 16);
        cut.truncate(cut.len() / 2);
        assert_eq!(f.image(&cut).unwrap_err().0, Reason::UndecodableImage);
        assert_eq!(f.image(&png(40, 16)).unwrap_err().0, Reason::AspectRatio);
        assert_eq!(f.image(&png(7, 7)).unwrap_err().0, Reason::TooSmall);
        let px = f.image(&png(16, 32)).unwrap();
        assert_eq!(px.len(), 8 * 8 * 3);
        assert!(px.chunks(3).all(|p| p == [9, 8, 7]));
    }
}
