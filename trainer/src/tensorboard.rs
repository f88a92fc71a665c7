//! TensorBoard event files, so that `tensorboard --logdir runs/` shows a run's metrics and its
//! sample grids.
//!
//! A file `events.out.tfevents.<unix secs>.<host>.<pid>.tessera` in the run directory (with
//! `.001`, `.002`, … appended when a run resumed in the same second and process finds it taken) holds
//! records, each `len: u64 LE`, `masked_crc32c(len bytes): u32 LE`, `data`, `masked_crc32c(data)`,
//! where `data` is one protobuf `Event` (TensorBoard's `event.proto`: wall time, step, and a
//! file version, a summary or a session log). The messages below declare only the fields
//! Tessera writes, with TensorBoard's field numbers; `prost` encodes them.
//!
//! A run that resumes from the checkpoint of update S opens a new file whose first event after
//! the version is a session-log START at step S + 1: TensorBoard then drops the earlier files'
//! events from that step on, the updates being redone (as `metrics.jsonl` is truncated to S).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use prost::Message;

/// `event.proto`'s `Event`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(oneof = "What", tags = "3, 5, 7")]
    pub what: Option<What>,
}

/// What an [`Event`] carries.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum What {
    /// The first event of every file: `brain.Event:2`.
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
    #[prost(message, tag = "7")]
    SessionLog(SessionLog),
}

/// `summary.proto`'s `Summary`: tagged values of one step.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<Value>,
}

/// `Summary.Value`: a scalar or an image under a tag.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Value {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(oneof = "Kind", tags = "2, 4")]
    pub kind: Option<Kind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Kind {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
    #[prost(message, tag = "4")]
    Image(Image),
}

/// `Summary.Image`: an encoded (PNG) picture.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Image {
    #[prost(int32, tag = "1")]
    pub height: i32,
    #[prost(int32, tag = "2")]
    pub width: i32,
    /// 3 = RGB.
    #[prost(int32, tag = "3")]
    pub colorspace: i32,
    #[prost(bytes = "vec", tag = "4")]
    pub encoded_image_string: Vec<u8>,
}

/// `event.proto`'s `SessionLog`; Tessera writes only START (1).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionLog {
    #[prost(int32, tag = "1")]
    pub status: i32,
}

const SESSION_START: i32 = 1;

/// TensorBoard's masked CRC-32C (Castagnoli) of a record's length and of its data.
pub fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One record: length, its masked CRC, the data, the data's masked CRC.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// Reads back the events of one file (the tests' and `trainer plot`'s reader), checking every
/// record's two CRCs.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut events = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let bad = |what: &str| anyhow::anyhow!("{}: record at byte {at}: {what}", path.display());
        let head = bytes
            .get(at..at + 12)
            .ok_or_else(|| bad("truncated header"))?;
        let len_bytes = &head[..8];
        if u32::from_le_bytes(head[8..12].try_into().unwrap()) != masked_crc(len_bytes) {
            return Err(bad("length CRC mismatch"));
        }
        let len = usize::try_from(u64::from_le_bytes(len_bytes.try_into().unwrap()))
            .map_err(|_| bad("length does not fit"))?;
        let end = at
            .checked_add(12)
            .and_then(|s| s.checked_add(len))
            .filter(|&e| e + 4 <= bytes.len())
            .ok_or_else(|| bad("truncated data"))?;
        let data = &bytes[at + 12..end];
        if u32::from_le_bytes(bytes[end..end + 4].try_into().unwrap()) != masked_crc(data) {
            return Err(bad("data CRC mismatch"));
        }
        events.push(Event::decode(data).map_err(|e| bad(&format!("not an Event: {e}")))?);
        at = end + 4;
    }
    Ok(events)
}

/// Appends events to one new file in a run directory.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Opens a new event file in `dir`. `resumed_at`: the checkpoint's step a resumed run
    /// continues from (TensorBoard then forgets the earlier files' events after it).
    pub fn create(dir: &Path, resumed_at: Option<u64>) -> Result<Self> {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let host = hostname();
        let name = format!(
            "events.out.tfevents.{secs:010}.{host}.{}.tessera",
            std::process::id()
        );
        // A run resumed within the same second by the same process (a test, an embedding
        // program) finds its name taken: numbered names sort after it, in order.
        let mut n = 0u32;
        let (path, file) = loop {
            let path = match n {
                0 => dir.join(&name),
                _ => dir.join(format!("{name}.{n:03}")),
            };
            match OpenOptions::new().create_new(true).write(true).open(&path) {
                Ok(file) => break (path, file),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 999 => n += 1,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("creating TensorBoard event file {}", path.display())
                    })
                }
            }
        };
        let mut w = EventWriter {
            path,
            out: BufWriter::new(file),
        };
        w.write(0, What::FileVersion("brain.Event:2".into()))?;
        if let Some(step) = resumed_at {
            w.write(
                step + 1,
                What::SessionLog(SessionLog {
                    status: SESSION_START,
                }),
            )?;
        }
        w.flush()?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Scalars of one step, under their names.
    pub fn scalars<'a>(
        &mut self,
        step: u64,
        values: impl IntoIterator<Item = (&'a str, f64)>,
    ) -> Result<()> {
        let value = values
            .into_iter()
            .map(|(tag, v)| Value {
                tag: tag.to_string(),
                kind: Some(Kind::SimpleValue(v as f32)),
            })
            .collect();
        self.write(step, What::Summary(Summary { value }))?;
        self.flush()
    }

    /// One RGB PNG picture of one step.
    pub fn image(
        &mut self,
        step: u64,
        tag: &str,
        png: Vec<u8>,
        width: u32,
        height: u32,
    ) -> Result<()> {
        let image = Image {
            height: height as i32,
            width: width as i32,
            colorspace: 3,
            encoded_image_string: png,
        };
        let value = vec![Value {
            tag: tag.to_string(),
            kind: Some(Kind::Image(image)),
        }];
        self.write(step, What::Summary(Summary { value }))?;
        self.flush()
    }

    fn write(&mut self, step: u64, what: What) -> Result<()> {
        let wall_time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let event = Event {
            wall_time,
            step: step as i64,
            what: Some(what),
        };
        self.out
            .write_all(&frame(&event.encode_to_vec()))
            .with_context(|| format!("writing {}", self.path.display()))
    }

    fn flush(&mut self) -> Result<()> {
        self.out
            .flush()
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// This machine's name, for the event file's name (as TensorBoard's writers do); `localhost`
/// if it cannot be read.
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into the buffer it is given.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]);
    let clean: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    if rc != 0 || clean.is_empty() {
        "localhost".into()
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CRC-32C's check value (the CRC of "123456789" is 0xE3069283), masked as TensorBoard does
    /// (rotated right by 15 bits, plus 0xA282EAD8), worked out by hand.
    #[test]
    fn masked_crc_is_tensorboards() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(masked_crc(b"123456789"), 0xc78a_b0e5);
    }

    /// Three writers opened at once in one process (as a run resumed within the same second
    /// does) get three files, the later ones named after the first with a number, in order.
    #[test]
    fn a_taken_name_gets_a_numbered_one() {
        let dir = tempfile::tempdir().unwrap();
        let writers: Vec<EventWriter> = (0..3)
            .map(|i| EventWriter::create(dir.path(), (i > 0).then_some(i)).unwrap())
            .collect();
        let names: Vec<String> = writers
            .iter()
            .map(|w| w.path().file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        let mut distinct = names.clone();
        distinct.dedup();
        assert_eq!(distinct.len(), 3, "{names:?}");
        let mut sorted = names.clone();
        sorted.sort();
        // Within one second the numbered names follow the first; across a second boundary the
        // later timestamp sorts after the earlier one anyway.
        assert_eq!(sorted, names, "{names:?}");
        assert!(names.iter().all(|n| n.contains("tfevents")), "{names:?}");
    }

    #[test]
    fn events_read_back_and_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path(), Some(7)).unwrap();
        w.scalars(8, [("loss", 1.5), ("lr", 1e-3)]).unwrap();
        w.image(8, "samples", vec![1, 2, 3], 4, 5).unwrap();
        let path = w.path().to_path_buf();
        drop(w);
        let events = read_events(&path).unwrap();
        assert_eq!(events.len(), 4);
        assert_eq!(
            events[0].what,
            Some(What::FileVersion("brain.Event:2".into()))
        );
        assert_eq!(
            (events[1].step, &events[1].what),
            (8, &Some(What::SessionLog(SessionLog { status: 1 })))
        );
        let Some(What::Summary(s)) = &events[2].what else {
            panic!("not a summary: {:?}", events[2]);
        };
        assert_eq!(events[2].step, 8);
        assert_eq!(s.value[0].tag, "loss");
        assert_eq!(s.value[0].kind, Some(Kind::SimpleValue(1.5)));
        assert_eq!(s.value[1].kind, Some(Kind::SimpleValue(1e-3)));
        let Some(What::Summary(s)) = &events[3].what else {
            panic!("not a summary: {:?}", events[3]);
        };
        let Some(Kind::Image(img)) = &s.value[0].kind else {
            panic!("not an image");
        };
        assert_eq!(
            (img.width, img.height, &img.encoded_image_string[..]),
            (4, 5, &[1u8, 2, 3][..])
        );

        // One flipped byte in the last record's data is caught by its CRC.
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 6] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = read_events(&path).unwrap_err().to_string();
        assert!(err.contains("data CRC mismatch"), "{err}");
    }
}
