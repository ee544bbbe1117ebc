//! Key material: the Ed25519 checkpoint key and the forward-evolving HMAC key.
//!
//! - Ed25519: a 32-byte seed in a file, raw or as 64 hex digits, readable by its owner only.
//!   [`generate_signing_key`] writes one (and `<file>.pub`, the public key in hex).
//! - HMAC: the writer keeps the key of the current epoch in a state file
//!   (`rampart-audit-hmac-v1 <epoch> <hex key>`). Moving to the next epoch computes
//!   `key[n+1] = HMAC-SHA256(key[n], "rampart-audit-evolve")`, replaces the file (write, fsync,
//!   rename, fsync the directory) and erases the old key from memory. Someone who takes the host
//!   at epoch n learns `key[n]` and the later ones, never the earlier ones, so the MACs of earlier
//!   records cannot be forged. The reviewer keeps the epoch-0 key that
//!   [`generate_hmac_key`] prints, off the host. Limit: the filesystem may keep the old file's
//!   blocks until they are reused; rename does not scrub the disk.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

type HmacSha256 = Hmac<Sha256>;

const HMAC_FILE_TAG: &str = "rampart-audit-hmac-v1";
const EVOLVE_LABEL: &[u8] = b"rampart-audit-evolve";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write key file {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} already exists: choose another path, or move the old key away first", path.display())]
    Exists { path: PathBuf },
    #[error("key file {} is not valid: {reason}", path.display())]
    Format { path: PathBuf, reason: String },
    #[error(
        "key file {} has mode {mode:o}: other users may read it; run `chmod 600 {}` (and consider the key exposed)",
        path.display(), path.display()
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("`{value}` is neither 64 hex digits nor a readable key file: {reason}")]
    Argument { value: String, reason: String },
    #[error("the system random number generator failed: {reason}")]
    Random { reason: String },
}

fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut out).ok()?;
    Some(out)
}

fn read_private(path: &Path) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    let read = |source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    std::fs::read(path).map(Zeroizing::new).map_err(read)
}

/// Reads an Ed25519 seed: 32 raw bytes, or 64 hex digits (surrounding whitespace allowed).
pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let bytes = read_private(path)?;
    let seed: Zeroizing<[u8; 32]> = if let Ok(raw) = <[u8; 32]>::try_from(bytes.as_slice()) {
        Zeroizing::new(raw)
    } else {
        let text = std::str::from_utf8(&bytes).map_err(|_| KeyError::Format {
            path: path.to_path_buf(),
            reason: "expected 32 raw bytes or 64 hex digits".into(),
        })?;
        Zeroizing::new(parse_hex32(text).ok_or_else(|| KeyError::Format {
            path: path.to_path_buf(),
            reason: "expected 32 raw bytes or 64 hex digits".into(),
        })?)
    };
    Ok(SigningKey::from_bytes(&seed))
}

/// `--pubkey`: 64 hex digits, or a file holding them (such as the `.pub` file keygen writes).
pub fn parse_public_key(arg: &str) -> Result<VerifyingKey, KeyError> {
    let bad = |reason: String| KeyError::Argument {
        value: arg.to_string(),
        reason,
    };
    let bytes = match parse_hex32(arg) {
        Some(b) => b,
        None => {
            let text = std::fs::read_to_string(arg).map_err(|e| bad(e.to_string()))?;
            parse_hex32(&text).ok_or_else(|| bad("the file does not hold 64 hex digits".into()))?
        }
    };
    VerifyingKey::from_bytes(&bytes).map_err(|e| bad(format!("not an Ed25519 public key: {e}")))
}

/// `--hmac-key`: the epoch-0 key as 64 hex digits, or a file holding them (or an HMAC state
/// file still at epoch 0).
pub fn parse_hmac_key(arg: &str) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    if let Some(k) = parse_hex32(arg) {
        return Ok(Zeroizing::new(k));
    }
    let bad = |reason: String| KeyError::Argument {
        value: arg.to_string(),
        reason,
    };
    let text = Zeroizing::new(std::fs::read_to_string(arg).map_err(|e| bad(e.to_string()))?);
    if let Some(k) = parse_hex32(&text) {
        return Ok(Zeroizing::new(k));
    }
    let (epoch, key) = parse_hmac_state(&text)
        .ok_or_else(|| bad("the file holds neither 64 hex digits nor an HMAC key state".into()))?;
    if epoch != 0 {
        return Err(bad(format!(
            "this key state is at epoch {epoch}; verification needs the initial (epoch 0) key that keygen printed"
        )));
    }
    Ok(key)
}

fn parse_hmac_state(text: &str) -> Option<(u64, Zeroizing<[u8; 32]>)> {
    let mut parts = text.split_whitespace();
    if parts.next()? != HMAC_FILE_TAG {
        return None;
    }
    let epoch = parts.next()?.parse().ok()?;
    let key = Zeroizing::new(parse_hex32(parts.next()?)?);
    if parts.next().is_some() {
        return None;
    }
    Some((epoch, key))
}

fn random32() -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let mut out = Zeroizing::new([0u8; 32]);
    getrandom::fill(out.as_mut()).map_err(|e| KeyError::Random { reason: e.to_string() })?;
    Ok(out)
}

/// 16 random bytes in hex: a new log id.
pub fn random_id() -> Result<String, KeyError> {
    let mut out = [0u8; 16];
    getrandom::fill(&mut out).map_err(|e| KeyError::Random { reason: e.to_string() })?;
    Ok(hex::encode(out))
}

fn create_new(path: &Path, mode: u32) -> Result<File, KeyError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                KeyError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                KeyError::Write {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })
}

fn write_synced(file: &mut File, path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|source| KeyError::Write {
            path: path.to_path_buf(),
            source,
        })
}

/// fsync of the directory holding `path`, so a create or rename survives a crash.
pub(crate) fn sync_parent(path: &Path) -> std::io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

/// Writes a new Ed25519 seed to `out` (hex, mode 0600, never overwriting) and its public key
/// to `<out>.pub`; returns the public key.
pub fn generate_signing_key(out: &Path) -> Result<VerifyingKey, KeyError> {
    let seed = random32()?;
    let key = SigningKey::from_bytes(&seed);
    let public = key.verifying_key();
    let mut file = create_new(out, 0o600)?;
    let text = Zeroizing::new(format!("{}\n", hex::encode(seed.as_ref())));
    write_synced(&mut file, out, text.as_bytes())?;
    let pub_path = PathBuf::from(format!("{}.pub", out.display()));
    let mut file = create_new(&pub_path, 0o644)?;
    write_synced(
        &mut file,
        &pub_path,
        format!("{}\n", hex::encode(public.to_bytes())).as_bytes(),
    )?;
    Ok(public)
}

/// Writes a new HMAC key state at epoch 0 to `out` (mode 0600, never overwriting) and returns
/// the initial key, which the reviewer keeps off the host for `verify --hmac-key`.
pub fn generate_hmac_key(out: &Path) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let key = random32()?;
    let mut file = create_new(out, 0o600)?;
    let text = Zeroizing::new(format!("{HMAC_FILE_TAG} 0 {}\n", hex::encode(key.as_ref())));
    write_synced(&mut file, out, text.as_bytes())?;
    Ok(key)
}

/// `key[n+1]` from `key[n]`.
pub fn evolve_key(key: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&hmac_sha256(key, &[EVOLVE_LABEL]));
    out
}

/// HMAC-SHA256 keyed with `key`. HMAC pads a key shorter than the hash's 64-byte block with
/// zeros (RFC 2104), so keying with the padded block is keying with the 32 bytes, without the
/// fallible length check of `new_from_slice`.
fn keyed(key: &[u8; 32]) -> HmacSha256 {
    let mut block = Zeroizing::new([0u8; 64]);
    for (d, s) in block.iter_mut().zip(key) {
        *d = *s;
    }
    <HmacSha256 as hmac::digest::KeyInit>::new(&(*block).into())
}

fn hmac_sha256(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = keyed(key);
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// The MAC of a record: HMAC-SHA256 over the MAC domain tag and the covered bytes.
pub fn record_mac(key: &[u8; 32], covered: &[u8]) -> [u8; 32] {
    hmac_sha256(key, &[crate::record::MAC_DOMAIN, covered])
}

/// Constant-time check of a record MAC.
pub fn check_record_mac(key: &[u8; 32], covered: &[u8], tag: &[u8]) -> bool {
    let mut mac = keyed(key);
    mac.update(crate::record::MAC_DOMAIN);
    mac.update(covered);
    mac.verify_slice(tag).is_ok()
}

/// The writer's HMAC key: the current epoch and its key, persisted in a state file.
pub struct HmacKeyState {
    path: PathBuf,
    epoch: u64,
    key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for HmacKeyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HmacKeyState")
            .field("path", &self.path)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl HmacKeyState {
    pub fn load(path: &Path) -> Result<HmacKeyState, KeyError> {
        let bytes = read_private(path)?;
        let text = std::str::from_utf8(&bytes).ok();
        let (epoch, key) = text.and_then(parse_hmac_state).ok_or_else(|| KeyError::Format {
            path: path.to_path_buf(),
            reason: format!(
                "expected `{HMAC_FILE_TAG} <epoch> <64 hex digits>` (create one with `rampart audit keygen --hmac`)"
            ),
        })?;
        Ok(HmacKeyState {
            path: path.to_path_buf(),
            epoch,
            key,
        })
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn mac(&self, covered: &[u8]) -> [u8; 32] {
        record_mac(&self.key, covered)
    }

    /// Moves to the next epoch: persists the new key first, then forgets the old one. On error
    /// nothing changed (the old key and the old file stay).
    pub fn evolve(&mut self) -> Result<(), KeyError> {
        let next = evolve_key(&self.key);
        let epoch = self.epoch + 1;
        let tmp = PathBuf::from(format!("{}.next", self.path.display()));
        let _ = std::fs::remove_file(&tmp);
        let mut file = create_new(&tmp, 0o600)?;
        let text = Zeroizing::new(format!("{HMAC_FILE_TAG} {epoch} {}\n", hex::encode(next.as_ref())));
        write_synced(&mut file, &tmp, text.as_bytes())?;
        std::fs::rename(&tmp, &self.path)
            .and_then(|()| sync_parent(&self.path))
            .map_err(|source| KeyError::Write {
                path: self.path.clone(),
                source,
            })?;
        // The old key is zeroed when its Zeroizing box is dropped here.
        self.key = next;
        self.epoch = epoch;
        Ok(())
    }
}

/// The verifier's keys: derives the key of any epoch from the initial one, moving forward
/// from the last epoch it derived.
pub struct KeyLadder {
    initial: Zeroizing<[u8; 32]>,
    epoch: u64,
    key: Zeroizing<[u8; 32]>,
}

impl KeyLadder {
    /// Epochs beyond this are refused rather than derived (a forged epoch could otherwise make
    /// the verifier compute HMACs for hours).
    pub const MAX_EPOCH: u64 = 10_000_000;

    pub fn new(initial: Zeroizing<[u8; 32]>) -> KeyLadder {
        KeyLadder {
            key: initial.clone(),
            initial,
            epoch: 0,
        }
    }

    /// The key of `epoch`, or `None` beyond [`MAX_EPOCH`](Self::MAX_EPOCH).
    pub fn key(&mut self, epoch: u64) -> Option<&[u8; 32]> {
        if epoch > Self::MAX_EPOCH {
            return None;
        }
        if epoch < self.epoch {
            self.key = self.initial.clone();
            self.epoch = 0;
        }
        while self.epoch < epoch {
            self.key = evolve_key(&self.key);
            self.epoch += 1;
        }
        Some(&self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_evolve() {
        let dir = tempfile::tempdir().unwrap();
        let seed = dir.path().join("sign.key");
        let public = generate_signing_key(&seed).unwrap();
        assert_eq!(load_signing_key(&seed).unwrap().verifying_key(), public);
        assert_eq!(std::fs::metadata(&seed).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(matches!(generate_signing_key(&seed), Err(KeyError::Exists { .. })));
        let pub_file = format!("{}.pub", seed.display());
        assert_eq!(parse_public_key(&pub_file).unwrap(), public);
        assert_eq!(parse_public_key(&hex::encode(public.to_bytes())).unwrap(), public);

        let raw = dir.path().join("raw.key");
        std::fs::write(&raw, [7u8; 32]).unwrap();
        std::fs::set_permissions(&raw, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(load_signing_key(&raw), Err(KeyError::Permissions { .. })));
        std::fs::set_permissions(&raw, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load_signing_key(&raw).unwrap().to_bytes(), [7u8; 32]);

        let state = dir.path().join("hmac.key");
        let initial = generate_hmac_key(&state).unwrap();
        assert_eq!(*parse_hmac_key(state.to_str().unwrap()).unwrap(), *initial);
        let mut s = HmacKeyState::load(&state).unwrap();
        s.evolve().unwrap();
        s.evolve().unwrap();
        let reloaded = HmacKeyState::load(&state).unwrap();
        assert_eq!(reloaded.epoch(), 2);
        let mut ladder = KeyLadder::new(initial);
        assert_eq!(*ladder.key(2).unwrap(), *reloaded.key);
        assert!(parse_hmac_key(state.to_str().unwrap()).is_err());
    }

    #[test]
    fn padded_key_is_the_plain_key() {
        let key = [9u8; 32];
        let mut plain = <HmacSha256 as Mac>::new_from_slice(&key).unwrap();
        plain.update(b"x");
        let expected: [u8; 32] = plain.finalize().into_bytes().into();
        assert_eq!(hmac_sha256(&key, &[b"x"]), expected);
    }
}
