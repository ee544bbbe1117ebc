//! The writer: appends records to the audit file, durably, one line at a time.
//!
//! Life of a log file:
//! - [`AuditLog::open`] creates the file (mode 0640, `O_APPEND`) or continues an existing one
//!   from its last line (log id, `seq`, chain hash, HMAC epoch), then appends an
//!   `audit_opened` system record whose outcome code says `new`, `clean` (the previous run ended
//!   with a close checkpoint) or `unclean` (it did not: a crash, or records removed from the
//!   end while rampart was stopped; the verifier reports it).
//! - [`AuditLog::append`] writes one record and fsyncs before it returns `Ok`: an `Err` means
//!   the record may not be on disk, and the caller must not apply the change (fail-closed).
//!   After a failed write the log refuses every later append: a half-written line would
//!   otherwise sit in the middle of the chain.
//! - Checkpoints (signed when a signing key is configured) are written every
//!   `checkpoint_every` records (just before the record that would exceed it), when
//!   [`AuditLog::checkpoint_if_due`] finds `checkpoint_interval` elapsed, at rotation and at
//!   [`AuditLog::close`].
//! - [`AuditLog::rotate`] ends the file with a rotation checkpoint, renames it to
//!   `<path>.<n>` (n one above the highest existing), and starts a new file whose first record,
//!   `audit_continued`, chains to that checkpoint.
//!
//! Dropping an `AuditLog` without `close` writes nothing: the next open records `unclean`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ed25519_dalek::{Signer, SigningKey};

use crate::keys::{self, HmacKeyState, KeyError};
use crate::record::{
    self, ACTION_CHECKPOINT, ACTION_CONTINUED, ACTION_OPENED, AuditEvent, AuditRecord, Checkpoint, CheckpointKind,
    FORMAT_VERSION, Outcome, Stage,
};
use crate::syslog::{MirrorStats, MirrorStatus, SyslogMirror, SyslogOptions};

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(
        "cannot open audit log {}: {source}; check that its directory exists and is writable by rampart",
        path.display()
    )]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the end of audit log {}: {source}", path.display())]
    ReadTail {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the last line of audit log {} is incomplete (a crash during a write?): run `rampart audit verify` on it, \
         then truncate it to {offset} bytes or move it aside to continue",
        path.display()
    )]
    PartialTail { path: PathBuf, offset: u64 },
    #[error(
        "the last line of audit log {} is not an audit record ({reason}): run `rampart audit verify` on it and move it \
         aside to start a new log",
        path.display()
    )]
    CorruptTail { path: PathBuf, reason: String },
    #[error(
        "audit log {} is format version {version}, this rampart writes version {FORMAT_VERSION}: rotate it away first",
        path.display()
    )]
    Version { path: PathBuf, version: u32 },
    #[error("cannot write to audit log {}: {source}; the record is not durable and the change must not be applied", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "audit log {} is unusable after an earlier failed write ({cause}): fix the disk, then restart rampart",
        path.display()
    )]
    Poisoned { path: PathBuf, cause: String },
    #[error("cannot rotate audit log {} to {}: {source}", path.display(), to.display())]
    Rotate {
        path: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "HMAC key state {} is at epoch {key_epoch} but the log's last record is at epoch {log_epoch}: restore the \
         matching key state, or start a new log with a new key (`rampart audit keygen --hmac`)",
        key_file.display()
    )]
    KeyEpoch {
        key_file: PathBuf,
        key_epoch: u64,
        log_epoch: u64,
    },
    #[error(
        "HMAC key state {} is at epoch {key_epoch}, but a new log must start at epoch 0: create a new key with \
         `rampart audit keygen --hmac`",
        key_file.display()
    )]
    UsedKey { key_file: PathBuf, key_epoch: u64 },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("cannot encode an audit record: {0}")]
    Encode(#[from] serde_json::Error),
}

/// How the log is written.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// Ed25519 seed file for checkpoint signatures; none: checkpoints are written unsigned.
    pub signing_key: Option<PathBuf>,
    /// Write a checkpoint after this many records (none: only time, rotation and close).
    pub checkpoint_every: Option<u64>,
    /// [`AuditLog::checkpoint_if_due`] writes a checkpoint when this much time has passed
    /// since the last one and records were written since.
    pub checkpoint_interval: Option<Duration>,
    /// HMAC key state file (see [`crate::keys`]); none: records carry no MAC.
    pub hmac_key: Option<PathBuf>,
    /// Records per HMAC epoch.
    pub epoch_records: u64,
    /// Mirror every record to syslog.
    pub syslog: Option<SyslogOptions>,
}

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions {
            signing_key: None,
            checkpoint_every: Some(1000),
            checkpoint_interval: Some(Duration::from_secs(300)),
            hmac_key: None,
            epoch_records: 1000,
            syslog: None,
        }
    }
}

/// What [`AuditLog::append`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub seq: u64,
    /// The record's chain hash in hex (the next record's `prev`).
    pub hash: String,
    /// What happened to its syslog copy, when a mirror is configured.
    pub syslog: Option<MirrorStatus>,
}

struct Hmac {
    state: HmacKeyState,
    epoch_records: u64,
    in_epoch: u64,
}

/// An open audit log.
pub struct AuditLog {
    path: PathBuf,
    file: File,
    log_id: String,
    next_seq: u64,
    prev: [u8; 32],
    signer: Option<SigningKey>,
    hmac: Option<Hmac>,
    since_checkpoint: u64,
    last_checkpoint: Instant,
    options: AuditOptions,
    mirror: Option<SyslogMirror>,
    poisoned: Option<String>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .field("log_id", &self.log_id)
            .field("next_seq", &self.next_seq)
            .finish_non_exhaustive()
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
}

/// Position of the last `\n` before byte `end` of `file`, scanning backwards in chunks.
fn rfind_newline(file: &mut File, end: u64) -> std::io::Result<Option<u64>> {
    const CHUNK: u64 = 64 * 1024;
    let mut pos = end;
    let mut chunk = Vec::new();
    while pos > 0 {
        let start = pos.saturating_sub(CHUNK);
        chunk.resize(usize::try_from(pos - start).unwrap_or(0), 0);
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(Some(start + i as u64));
        }
        pos = start;
    }
    Ok(None)
}

/// The last line of `file` (without its newline), or `None` when the file is empty.
fn last_line(file: &mut File, path: &Path) -> Result<Option<Vec<u8>>, AuditError> {
    let read_err = |source| AuditError::ReadTail {
        path: path.to_path_buf(),
        source,
    };
    let len = file.metadata().map_err(read_err)?.len();
    if len == 0 {
        return Ok(None);
    }
    let mut byte = [0u8; 1];
    file.seek(SeekFrom::Start(len - 1)).map_err(read_err)?;
    file.read_exact(&mut byte).map_err(read_err)?;
    if byte != [b'\n'] {
        let offset = rfind_newline(file, len).map_err(read_err)?.map_or(0, |p| p + 1);
        return Err(AuditError::PartialTail {
            path: path.to_path_buf(),
            offset,
        });
    }
    let start = rfind_newline(file, len - 1).map_err(read_err)?.map_or(0, |p| p + 1);
    let mut line = vec![0u8; usize::try_from(len - 1 - start).unwrap_or(0)];
    file.seek(SeekFrom::Start(start)).map_err(read_err)?;
    file.read_exact(&mut line).map_err(read_err)?;
    Ok(Some(line))
}

/// `<path>.<n>` with n one above the highest rotated file that exists.
fn next_rotation_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let prefix = format!("{name}.");
    let highest = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.strip_prefix(&prefix)?.parse::<u64>().ok()
                })
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0);
    dir.join(format!("{name}.{}", highest + 1))
}

impl AuditLog {
    /// Opens (or creates) the log at `path` and appends its `audit_opened` record.
    pub fn open(path: &Path, options: AuditOptions) -> Result<AuditLog, AuditError> {
        let mut file = open_append(path).map_err(|source| AuditError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let last = last_line(&mut file, path)?;
        let last = match last {
            None => None,
            Some(line) => {
                let rec: AuditRecord = serde_json::from_slice(&line).map_err(|e| AuditError::CorruptTail {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })?;
                if rec.v != FORMAT_VERSION {
                    return Err(AuditError::Version {
                        path: path.to_path_buf(),
                        version: rec.v,
                    });
                }
                Some((record::chain_hash(&line), rec))
            }
        };
        if last.is_none() {
            // A new log: 0640 whatever the umask, and its directory entry made durable.
            let is_file = file.metadata().is_ok_and(|m| m.file_type().is_file());
            if is_file {
                file.set_permissions(std::fs::Permissions::from_mode(0o640))
                    .and_then(|()| keys::sync_parent(path))
                    .map_err(|source| AuditError::Open {
                        path: path.to_path_buf(),
                        source,
                    })?;
            }
        }
        let signer = options.signing_key.as_deref().map(keys::load_signing_key).transpose()?;
        let hmac = match &options.hmac_key {
            None => None,
            Some(key_file) => {
                let mut state = HmacKeyState::load(key_file)?;
                match last.as_ref().and_then(|(_, r)| r.epoch) {
                    None if last.is_none() && state.epoch() != 0 => {
                        return Err(AuditError::UsedKey {
                            key_file: key_file.clone(),
                            key_epoch: state.epoch(),
                        });
                    }
                    None => {}
                    // This run starts a fresh epoch, so the previous run's key is erased.
                    Some(e) if e == state.epoch() => state.evolve()?,
                    Some(e) if e + 1 == state.epoch() => {}
                    Some(e) => {
                        return Err(AuditError::KeyEpoch {
                            key_file: key_file.clone(),
                            key_epoch: state.epoch(),
                            log_epoch: e,
                        });
                    }
                }
                Some(Hmac {
                    state,
                    epoch_records: options.epoch_records.max(1),
                    in_epoch: 0,
                })
            }
        };
        let opened_with = |code: &str, message: String| Outcome {
            code: Some(code.into()),
            ..Outcome::ok(message)
        };
        let (log_id, next_seq, prev, opened) = match &last {
            None => (keys::random_id()?, 0, [0u8; 32], opened_with("new", "new log".into())),
            Some((hash, rec)) => {
                let opened = if rec.checkpoint_kind() == Some(CheckpointKind::Close) {
                    opened_with("clean", format!("reopened after a clean close at seq {}", rec.seq))
                } else {
                    opened_with(
                        "unclean",
                        format!(
                            "reopened after an unclean shutdown: the last record, seq {}, is not a close checkpoint",
                            rec.seq
                        ),
                    )
                };
                (rec.log_id.clone(), rec.seq + 1, *hash, opened)
            }
        };
        let mirror = options.syslog.clone().map(SyslogMirror::new);
        let mut log = AuditLog {
            path: path.to_path_buf(),
            file,
            log_id,
            next_seq,
            prev,
            signer,
            hmac,
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            options,
            mirror,
            poisoned: None,
        };
        let mut event = AuditEvent::system(ACTION_OPENED, opened);
        event.target = Some(path.display().to_string());
        log.append(event)?;
        Ok(log)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn log_id(&self) -> &str {
        &self.log_id
    }

    /// The sequence number the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Counters of the syslog mirror, when there is one.
    pub fn syslog_stats(&self) -> Option<MirrorStats> {
        self.mirror.as_ref().map(SyslogMirror::stats)
    }

    /// Appends one record and fsyncs it. `Ok` means it is durable; on `Err` the caller must
    /// not apply the change it describes.
    pub fn append(&mut self, event: AuditEvent) -> Result<Appended, AuditError> {
        if self
            .options
            .checkpoint_every
            .is_some_and(|every| self.since_checkpoint >= every.max(1))
        {
            self.write_checkpoint(CheckpointKind::Count)?;
        }
        let rec = self.record(event.stage, event.action);
        let rec = AuditRecord {
            actor: event.actor,
            request_id: event.request_id,
            target: event.target,
            request: event.request,
            received_seq: event.received_seq,
            outcome: event.outcome,
            state_before: event.state_before,
            state_after: event.state_after,
            processes: event.processes,
            ..rec
        };
        self.write(rec)
    }

    /// Writes a checkpoint now.
    pub fn checkpoint(&mut self) -> Result<Appended, AuditError> {
        self.write_checkpoint(CheckpointKind::Manual)
    }

    /// Writes a time checkpoint when `checkpoint_interval` has passed since the last one and
    /// records were written since. Call it from a timer, with the current time.
    pub fn checkpoint_if_due(&mut self, now: Instant) -> Result<Option<Appended>, AuditError> {
        match self.options.checkpoint_interval {
            Some(interval)
                if self.since_checkpoint > 0 && now.saturating_duration_since(self.last_checkpoint) >= interval =>
            {
                self.write_checkpoint(CheckpointKind::Time).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// Ends the log cleanly with a close checkpoint.
    pub fn close(mut self) -> Result<Appended, AuditError> {
        self.write_checkpoint(CheckpointKind::Close)
    }

    /// Ends this file with a rotation checkpoint, renames it to `<path>.<n>` and continues the
    /// chain in a new file at `path`. Returns the rotated file's path. On error the log keeps
    /// writing where it was (the rotation checkpoint then simply sits mid-file).
    pub fn rotate(&mut self) -> Result<PathBuf, AuditError> {
        let checkpoint = self.write_checkpoint(CheckpointKind::Rotation)?;
        let rotated = next_rotation_path(&self.path);
        let tmp = PathBuf::from(format!("{}.rotating", self.path.display()));
        let _ = std::fs::remove_file(&tmp);
        let mut new_file = match OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .mode(0o640)
            .open(&tmp)
        {
            Ok(f) => f,
            Err(source) => return Err(self.rotate_error(&rotated, source)),
        };
        if let Err(source) = new_file.set_permissions(std::fs::Permissions::from_mode(0o640)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(self.rotate_error(&rotated, source));
        }
        let mut rec = self.record(Stage::System, ACTION_CONTINUED.into());
        rec.target = Some(rotated.display().to_string());
        rec.outcome = Some(Outcome {
            code: Some("continued".into()),
            ..Outcome::ok(format!(
                "continues {}, which ends with the rotation checkpoint at seq {}",
                rotated.display(),
                checkpoint.seq
            ))
        });
        let (line, rec) = self.encode(rec)?;
        let staged = new_file
            .write_all(&line)
            .and_then(|()| new_file.sync_data())
            .and_then(|()| std::fs::rename(&self.path, &rotated));
        if let Err(source) = staged {
            let _ = std::fs::remove_file(&tmp);
            return Err(self.rotate_error(&rotated, source));
        }
        if let Err(source) = std::fs::rename(&tmp, &self.path).and_then(|()| keys::sync_parent(&self.path)) {
            // Put the old file back so writing can go on where it was.
            let _ = std::fs::rename(&rotated, &self.path);
            let _ = std::fs::remove_file(&tmp);
            return Err(self.rotate_error(&rotated, source));
        }
        self.file = new_file;
        self.commit(&line, &rec);
        Ok(rotated)
    }

    fn rotate_error(&self, to: &Path, source: std::io::Error) -> AuditError {
        AuditError::Rotate {
            path: self.path.clone(),
            to: to.to_path_buf(),
            source,
        }
    }

    fn record(&self, stage: Stage, action: String) -> AuditRecord {
        AuditRecord {
            v: FORMAT_VERSION,
            log_id: self.log_id.clone(),
            seq: self.next_seq,
            time: record::now_rfc3339(),
            stage,
            actor: None,
            request_id: None,
            action,
            target: None,
            request: None,
            received_seq: None,
            outcome: None,
            state_before: None,
            state_after: None,
            processes: None,
            checkpoint: None,
            prev: hex::encode(self.prev),
            epoch: None,
            mac: None,
        }
    }

    fn write_checkpoint(&mut self, kind: CheckpointKind) -> Result<Appended, AuditError> {
        let mut rec = self.record(Stage::Checkpoint, ACTION_CHECKPOINT.into());
        let (pubkey, sig) = match &self.signer {
            Some(key) => {
                let message = record::checkpoint_message(&rec.log_id, rec.seq, &rec.prev, kind, &rec.time);
                (
                    Some(hex::encode(key.verifying_key().to_bytes())),
                    Some(hex::encode(key.sign(&message).to_bytes())),
                )
            }
            None => (None, None),
        };
        rec.checkpoint = Some(Checkpoint { kind, pubkey, sig });
        let appended = self.write(rec)?;
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        Ok(appended)
    }

    /// Serializes a record as its line (with the newline), adding epoch and MAC. May move the
    /// HMAC key to its next epoch first.
    fn encode(&mut self, mut rec: AuditRecord) -> Result<(Vec<u8>, AuditRecord), AuditError> {
        if let Some(h) = &mut self.hmac {
            if h.in_epoch >= h.epoch_records {
                h.state.evolve()?;
                h.in_epoch = 0;
            }
            rec.epoch = Some(h.state.epoch());
        }
        rec.mac = None;
        let mut line = serde_json::to_vec(&rec)?;
        if let Some(h) = &self.hmac {
            // `mac` is the last field: the MAC covers exactly the line without it.
            let mac = hex::encode(h.state.mac(&line));
            line.pop();
            line.extend_from_slice(b",\"mac\":\"");
            line.extend_from_slice(mac.as_bytes());
            line.extend_from_slice(b"\"}");
            rec.mac = Some(mac);
        }
        line.push(b'\n');
        Ok((line, rec))
    }

    fn write(&mut self, rec: AuditRecord) -> Result<Appended, AuditError> {
        if let Some(cause) = &self.poisoned {
            return Err(AuditError::Poisoned {
                path: self.path.clone(),
                cause: cause.clone(),
            });
        }
        let (line, rec) = self.encode(rec)?;
        if let Err(source) = self.file.write_all(&line).and_then(|()| self.file.sync_data()) {
            self.poisoned = Some(source.to_string());
            return Err(AuditError::Write {
                path: self.path.clone(),
                source,
            });
        }
        Ok(self.commit(&line, &rec))
    }

    /// Advances the chain past a durable line and mirrors it.
    fn commit(&mut self, line: &[u8], rec: &AuditRecord) -> Appended {
        let body = line.strip_suffix(b"\n").unwrap_or(line);
        self.prev = record::chain_hash(body);
        self.next_seq += 1;
        self.since_checkpoint += 1;
        if let Some(h) = &mut self.hmac {
            h.in_epoch += 1;
        }
        let hash = hex::encode(self.prev);
        let syslog = self.mirror.as_mut().map(|m| m.send_record(rec, &hash));
        Appended {
            seq: rec.seq,
            hash,
            syslog,
        }
    }
}
