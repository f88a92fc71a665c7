//! Ingest counters: why each input was dropped, per output shard and in total (`stats.json`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Why an input did not become a record. `as_str` is the key in `stats.json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    /// A tar entry with a `..` component or an absolute path (never read, never written).
    UnsafePath,
    /// A malformed source record (bad JSONL line, CSV row without fields, non-file tar entry…).
    BadRecord,
    /// A caption without an image.
    MissingImage,
    /// An image without a caption.
    MissingCaption,
    /// The image or caption file could not be read.
    Unreadable,
    /// The caption is not UTF-8.
    NonUtf8Caption,
    /// Fewer characters than `--min-caption-chars`.
    CaptionTooShort,
    /// More characters than `--max-caption-chars`.
    CaptionTooLong,
    /// The caption matches a boilerplate pattern.
    BoilerplateCaption,
    /// The image does not decode (zero-byte, truncated, corrupt, unsupported format).
    UndecodableImage,
    /// Width / height outside [1/2, 2].
    AspectRatio,
    /// Shorter side below `--min-side`.
    TooSmall,
    /// The resized pixels equal those of an earlier record.
    Duplicate,
}

impl Reason {
    /// Every reason, in `stats.json` order.
    pub const ALL: [Reason; 13] = [
        Reason::UnsafePath,
        Reason::BadRecord,
        Reason::MissingImage,
        Reason::MissingCaption,
        Reason::Unreadable,
        Reason::NonUtf8Caption,
        Reason::CaptionTooShort,
        Reason::CaptionTooLong,
        Reason::BoilerplateCaption,
        Reason::UndecodableImage,
        Reason::AspectRatio,
        Reason::TooSmall,
        Reason::Duplicate,
    ];

    /// The counter's name in `stats.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::UnsafePath => "unsafe_path",
            Reason::BadRecord => "bad_record",
            Reason::MissingImage => "missing_image",
            Reason::MissingCaption => "missing_caption",
            Reason::Unreadable => "unreadable",
            Reason::NonUtf8Caption => "non_utf8_caption",
            Reason::CaptionTooShort => "caption_too_short",
            Reason::CaptionTooLong => "caption_too_long",
            Reason::BoilerplateCaption => "boilerplate_caption",
            Reason::UndecodableImage => "undecodable_image",
            Reason::AspectRatio => "aspect_ratio",
            Reason::TooSmall => "too_small",
            Reason::Duplicate => "duplicate",
        }
    }
}

/// Examples kept per reason (input names and details), for the user to look at.
pub const EXAMPLES_PER_REASON: usize = 5;

/// Counters of one output shard's input group, or of a whole run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub inputs_seen: u64,
    pub records_written: u64,
    /// Dropped inputs per reason (every reason present, zeros included).
    pub rejected: BTreeMap<String, u64>,
    /// The first few dropped inputs per reason: "name: detail".
    pub examples: BTreeMap<String, Vec<String>>,
}

impl Counts {
    /// Empty counters with every reason at zero.
    pub fn new() -> Self {
        Self {
            rejected: Reason::ALL
                .iter()
                .map(|r| (r.as_str().to_string(), 0))
                .collect(),
            ..Self::default()
        }
    }

    /// Counts one dropped input.
    pub fn reject(&mut self, reason: Reason, name: &str, detail: &str) {
        self.inputs_seen += 1;
        *self.rejected.entry(reason.as_str().into()).or_default() += 1;
        let ex = self.examples.entry(reason.as_str().into()).or_default();
        if ex.len() < EXAMPLES_PER_REASON {
            ex.push(format!("{name}: {detail}"));
        }
    }

    /// Counts one written record.
    pub fn accept(&mut self) {
        self.inputs_seen += 1;
        self.records_written += 1;
    }

    /// Total dropped inputs.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }

    /// Adds `other` (a later group) to these counters.
    pub fn merge(&mut self, other: &Counts) {
        self.inputs_seen += other.inputs_seen;
        self.records_written += other.records_written;
        for (k, v) in &other.rejected {
            *self.rejected.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.examples {
            let ex = self.examples.entry(k.clone()).or_default();
            for e in v {
                if ex.len() < EXAMPLES_PER_REASON {
                    ex.push(e.clone());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_and_merge() {
        let mut a = Counts::new();
        a.accept();
        for i in 0..7 {
            a.reject(Reason::Duplicate, &format!("k{i}"), "same pixels");
        }
        let mut b = Counts::new();
        b.reject(Reason::TooSmall, "x", "10x10");
        a.merge(&b);
        assert_eq!(a.inputs_seen, 9);
        assert_eq!(a.records_written + a.rejected_total(), a.inputs_seen);
        assert_eq!(a.examples["duplicate"].len(), EXAMPLES_PER_REASON);
        assert_eq!(a.rejected["too_small"], 1);
        assert_eq!(a.rejected.len(), Reason::ALL.len());
    }
}
