//! Authentication of the rendezvous store's frames: the run's secret, where it comes from, and
//! the per-connection [`Session`] that tags every frame with an HMAC-SHA256.
//!
//! Every connection opens with a handshake: the client sends `hello` with a fresh 32-byte nonce,
//! the store answers with a fresh nonce of its own. Both derive the session key
//!
//! ```text
//! K = HMAC-SHA256(secret, "tessera-store-v1" ‖ len(run id) ‖ run id ‖ client nonce ‖ store nonce)
//! ```
//!
//! and from then on every frame, both ways, carries `HMAC-SHA256(K, direction ‖ sequence ‖ JSON)`:
//! the direction byte (`C` client to store, `S` store to client) and a per-direction counter
//! that both ends keep (it is not sent). The store checks the tag, in constant time, before it
//! parses the JSON; a frame whose tag does not verify is refused and the connection closed. So
//! without the secret nobody can produce a frame the store accepts; a frame captured on one
//! connection does not verify on another (other nonces, another key) nor twice on its own (the
//! counter moved on), and a store without the secret cannot answer a client. The secret itself
//! never crosses the wire. The frames are not encrypted (see docs/cluster.md).
//!
//! The secret: [`SECRET_FILE_ENV`] names a file only its owner can read, or [`SECRET_ENV`] holds
//! it; at least [`MIN_SECRET_LEN`] bytes. On one node the launcher generates one
//! ([`Secret::generate`]) and gives it to its workers in a file of its private directory.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The variable naming a file that holds the secret (read first).
pub const SECRET_FILE_ENV: &str = "TESSERA_STORE_SECRET_FILE";
/// The variable holding the secret itself.
pub const SECRET_ENV: &str = "TESSERA_STORE_SECRET";
/// The shortest secret accepted, in bytes (`openssl rand -hex 32` gives 64).
pub const MIN_SECRET_LEN: usize = 32;
/// The longest secret accepted, in bytes.
pub const MAX_SECRET_LEN: usize = 4096;
/// Bytes of a handshake nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes of a frame's tag.
pub const TAG_LEN: usize = 32;
/// The protocol version a `hello` carries.
pub const VERSION: u32 = 1;

type HmacSha256 = Hmac<Sha256>;

/// A run's shared secret. Its `Debug` does not show it.
#[derive(Clone)]
pub struct Secret(Arc<[u8]>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<{} bytes>)", self.0.len())
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Secret) -> bool {
        // Constant time (a MAC's comparison): equal lengths, then every byte.
        self.0.len() == other.0.len()
            && self
                .0
                .iter()
                .zip(other.0.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

impl Eq for Secret {}

/// Why a secret could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}: {message}")]
pub struct SecretError {
    /// Where it was read: the variable, or the variable and the file.
    pub source_name: String,
    pub message: String,
}

impl Secret {
    /// 32 random bytes from the operating system, as 64 hex digits.
    pub fn generate() -> io::Result<Secret> {
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).map_err(|e| io::Error::other(format!("getrandom: {e}")))?;
        Ok(Secret(hex(&raw).into_bytes().into()))
    }

    /// A secret from text (trailing whitespace, such as a file's newline, removed); `source`
    /// names where it came from in errors, which never show the text.
    pub fn from_text(text: &[u8], source: &str) -> Result<Secret, SecretError> {
        let end = text
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        let text = &text[..end];
        let err = |message: String| SecretError {
            source_name: source.to_string(),
            message,
        };
        if text.len() < MIN_SECRET_LEN {
            return Err(err(format!(
                "the secret has {} bytes, fewer than the {MIN_SECRET_LEN} required; make one with \
                 `openssl rand -hex 32`",
                text.len()
            )));
        }
        if text.len() > MAX_SECRET_LEN {
            return Err(err(format!(
                "the secret has {} bytes, more than the {MAX_SECRET_LEN} allowed",
                text.len()
            )));
        }
        Ok(Secret(text.into()))
    }

    /// Reads a secret file, which must belong to this user and be readable by nobody else
    /// (mode 0600 or 0400): a group- or world-readable file is refused.
    pub fn from_file(path: &Path) -> Result<Secret, SecretError> {
        use std::os::unix::fs::MetadataExt;
        let source = format!("{SECRET_FILE_ENV} = {}", path.display());
        let err = |message: String| SecretError {
            source_name: source.clone(),
            message,
        };
        let meta = std::fs::metadata(path).map_err(|e| err(format!("cannot read it: {e}")))?;
        if !meta.is_file() {
            return Err(err("not a regular file".into()));
        }
        // SAFETY: geteuid cannot fail.
        let uid = unsafe { libc::geteuid() };
        if meta.uid() != uid {
            return Err(err(format!(
                "owned by uid {}, not by this user (uid {uid}); the secret file must be yours",
                meta.uid()
            )));
        }
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(err(format!(
                "mode {mode:04o} lets the group or others read or write it; `chmod 600 {}`",
                path.display()
            )));
        }
        if meta.len() > MAX_SECRET_LEN as u64 + 64 {
            return Err(err(format!(
                "{} bytes, more than the {MAX_SECRET_LEN} a secret may have",
                meta.len()
            )));
        }
        let text = std::fs::read(path).map_err(|e| err(format!("cannot read it: {e}")))?;
        Secret::from_text(&text, &source)
    }

    /// The secret the environment names: [`SECRET_FILE_ENV`]'s file, else [`SECRET_ENV`]'s value;
    /// `None` when neither is set. Both set is an error (which one would win is not obvious).
    pub fn from_lookup(
        get: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<Secret>, SecretError> {
        match (get(SECRET_FILE_ENV), get(SECRET_ENV)) {
            (Some(_), Some(_)) => Err(SecretError {
                source_name: format!("{SECRET_FILE_ENV} and {SECRET_ENV}"),
                message: "both are set; set only one".into(),
            }),
            (Some(file), None) => Secret::from_file(Path::new(&file)).map(Some),
            (None, Some(text)) => Secret::from_text(text.as_bytes(), SECRET_ENV).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// Writes the secret to a new file `name` in `dir` with mode 0600 (the file must not exist).
    pub fn write_private(&self, dir: &Path, name: &str) -> io::Result<PathBuf> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(&self.0)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        Ok(path)
    }

    /// The secret's bytes, for a launcher that passes it on (ssh's stdin).
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

/// What a connection to the store needs: the run id and the run's secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub run_id: String,
    pub secret: Secret,
}

/// A fresh random nonce.
pub fn nonce() -> io::Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| io::Error::other(format!("getrandom: {e}")))?;
    Ok(n)
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A nonce from its hex text; `None` unless exactly [`NONCE_LEN`] bytes of hex.
pub fn parse_nonce(text: &str) -> Option<[u8; NONCE_LEN]> {
    let t = text.as_bytes();
    if t.len() != 2 * NONCE_LEN {
        return None;
    }
    let mut out = [0u8; NONCE_LEN];
    for (i, pair) in t.chunks_exact(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// Which end of a connection a [`Session`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Client,
    Store,
}

/// One connection's key and counters.
pub struct Session {
    key: [u8; 32],
    role: Role,
    sent: u64,
    received: u64,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("role", &self.role)
            .field("sent", &self.sent)
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

/// A frame whose tag does not verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("frame {sequence} of this connection does not carry a valid tag for this run's secret")]
pub struct BadTag {
    pub sequence: u64,
}

fn keyed(key: &[u8]) -> HmacSha256 {
    // HMAC takes a key of any length.
    <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts any key length")
}

impl Session {
    /// The session of one connection, after the handshake.
    pub fn new(
        secret: &Secret,
        run_id: &str,
        client_nonce: &[u8; NONCE_LEN],
        store_nonce: &[u8; NONCE_LEN],
        role: Role,
    ) -> Session {
        let mut m = keyed(&secret.0);
        m.update(b"tessera-store-v1");
        m.update(&(run_id.len() as u64).to_be_bytes());
        m.update(run_id.as_bytes());
        m.update(client_nonce);
        m.update(store_nonce);
        Session {
            key: m.finalize().into_bytes().into(),
            role,
            sent: 0,
            received: 0,
        }
    }

    fn mac(&self, from: Role, sequence: u64, json: &[u8]) -> HmacSha256 {
        let mut m = keyed(&self.key);
        m.update(match from {
            Role::Client => b"C",
            Role::Store => b"S",
        });
        m.update(&sequence.to_be_bytes());
        m.update(json);
        m
    }

    /// The tag of the next frame this end sends.
    pub fn seal(&mut self, json: &[u8]) -> [u8; TAG_LEN] {
        let tag = self.mac(self.role, self.sent, json).finalize().into_bytes();
        self.sent += 1;
        tag.into()
    }

    /// Checks the tag of the next frame from the other end (constant-time comparison).
    pub fn open(&mut self, tag: &[u8; TAG_LEN], json: &[u8]) -> Result<(), BadTag> {
        let from = match self.role {
            Role::Client => Role::Store,
            Role::Store => Role::Client,
        };
        self.mac(from, self.received, json)
            .verify_slice(tag)
            .map_err(|_| BadTag {
                sequence: self.received,
            })?;
        self.received += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Secret {
        Secret::from_text(s.as_bytes(), "test").unwrap()
    }

    const S: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn sessions_agree_and_refuse_forgery_replay_and_other_keys() {
        let (cn, sn) = ([1u8; NONCE_LEN], [2u8; NONCE_LEN]);
        let mut client = Session::new(&secret(S), "r1", &cn, &sn, Role::Client);
        let mut store = Session::new(&secret(S), "r1", &cn, &sn, Role::Store);
        let t0 = client.seal(b"{\"a\":1}");
        store.open(&t0, b"{\"a\":1}").unwrap();
        // The same frame again (a replay on this connection): the counter has moved on.
        assert_eq!(store.open(&t0, b"{\"a\":1}"), Err(BadTag { sequence: 1 }));
        let t1 = client.seal(b"{\"a\":2}");
        // A changed body, or the store's own direction, does not verify.
        assert!(store.open(&t1, b"{\"a\":3}").is_err());
        store.open(&t1, b"{\"a\":2}").unwrap();
        let back = store.seal(b"ok");
        client.open(&back, b"ok").unwrap();
        // Another connection (another store nonce), another secret, another run id.
        for mut other in [
            Session::new(&secret(S), "r1", &cn, &[3u8; NONCE_LEN], Role::Store),
            Session::new(&secret(&S.replace('0', "1")), "r1", &cn, &sn, Role::Store),
            Session::new(&secret(S), "r2", &cn, &sn, Role::Store),
        ] {
            assert!(other.open(&t0, b"{\"a\":1}").is_err());
        }
    }

    #[test]
    fn secrets_are_checked_and_never_shown() {
        let e = Secret::from_text(b"short\n", SECRET_ENV).unwrap_err();
        assert!(
            e.to_string()
                .contains("TESSERA_STORE_SECRET: the secret has 5 bytes"),
            "{e}"
        );
        assert!(!e.to_string().contains("short"), "{e}");
        let s = secret(&format!("{S}\n"));
        assert_eq!(s, secret(S));
        assert!(!format!("{s:?}").contains("0123"));
        let g = Secret::generate().unwrap();
        assert_eq!(g.expose().len(), 64);
        assert_ne!(g, Secret::generate().unwrap());
        assert_eq!(parse_nonce(&hex(&[7u8; NONCE_LEN])), Some([7u8; NONCE_LEN]));
        assert_eq!(parse_nonce("zz"), None);
    }

    #[test]
    fn a_secret_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let s = secret(S);
        let path = s.write_private(dir.path(), "secret").unwrap();
        let get = |k: &str| (k == SECRET_FILE_ENV).then(|| path.display().to_string());
        assert_eq!(Secret::from_lookup(&get).unwrap(), Some(s.clone()));
        for mode in [0o640, 0o604, 0o660] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = Secret::from_lookup(&get).unwrap_err().to_string();
            assert!(
                e.contains(SECRET_FILE_ENV) && e.contains(&format!("mode {mode:04o}")),
                "{e}"
            );
            assert!(e.contains("chmod 600"), "{e}");
        }
        let both = |k: &str| Some(format!("{k}-{S}"));
        assert!(Secret::from_lookup(&both)
            .unwrap_err()
            .to_string()
            .contains("set only one"));
        assert_eq!(Secret::from_lookup(&|_| None).unwrap(), None);
        let missing = |k: &str| (k == SECRET_FILE_ENV).then(|| "/nonexistent/secret".to_string());
        let e = Secret::from_lookup(&missing).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/secret: cannot read it"), "{e}");
    }
}
