//! The writer: appends records to the audit file, durably, one line at a time.
//!
//! Life of a log file:
//! - [`AuditLog::open`] takes the file's writer's lock (an exclusive `flock`, held while the
//!   log is open and released by a crash too: a second rampart started on the same file is
//!   refused before it writes a byte, which would break the chain of the first), creates the
//!   file (mode 0640, `O_APPEND`) or continues an existing one from its last line (log id,
//!   `seq`, chain hash, HMAC epoch), then appends an `audit_opened` system record whose
//!   outcome code says `new`, `clean` (the previous run ended with a close checkpoint) or
//!   `unclean` (it did not: a crash, or records removed from the end while rampart was
//!   stopped; the verifier reports it).
//! - A file that ends with a torn write (a last line without its newline, or a last line that
//!   is not a record: a crash during a write, or an older rampart on a full disk) is repaired
//!   first: the torn bytes are copied to a side file `<log>.torn-<UTC time>` next to the log
//!   (nothing is destroyed), the log is cut back to its last complete record, and the first new
//!   record, `audit_repaired`, says what was cut ([`TornTail`]: offset, length, SHA-256, side
//!   file). If that record cannot be written, the torn bytes are put back and the open fails.
//! - [`AuditLog::append`] writes one record and fsyncs before it returns `Ok`. A write that
//!   fails (a full disk, an I/O error) leaves nothing behind: the file is cut back (ftruncate)
//!   to the length it had before the record, so it always ends at a record boundary, and the
//!   sequence number and chain head do not move. The caller must not apply the change it
//!   describes (fail-closed). The log stays usable: the next append tries again, and the first
//!   record written after one or more failures is an `audit_write_failed` system record (how
//!   many records were lost, of which kinds, since when, and why), so the trail says what it
//!   is missing. If the cut itself fails, every later write retries it first.
//! - Checkpoints (signed when a signing key is configured) are written every
//!   `checkpoint_every` records (just before the record that would exceed it), when
//!   [`AuditLog::checkpoint_if_due`] finds `checkpoint_interval` elapsed, at rotation and at
//!   [`AuditLog::close`]. `checkpoint_if_due`, called from the caller's timer, is also what
//!   writes a pending `audit_write_failed` record as soon as space returns.
//! - [`AuditLog::rotate`] first creates the new file and reserves room in it (fallocate), so
//!   that on a full disk the rotation fails before anything is written; then it ends the file
//!   with a rotation checkpoint, writes the new file's first record, `audit_continued`, which
//!   chains to that checkpoint, and renames the files (the old one to `<path>.<n>`, n one above
//!   the highest existing). A failed rotation leaves the current file in place and usable.
//!
//! Dropping an `AuditLog` without `close` writes nothing: the next open records `unclean`.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};

use crate::keys::{self, HmacKeyState, KeyError};
use crate::record::{
    self, ACTION_CHECKPOINT, ACTION_CONTINUED, ACTION_OPENED, ACTION_REPAIRED, ACTION_WRITE_FAILED, AuditEvent,
    AuditRecord, Checkpoint, CheckpointKind, FORMAT_VERSION, Outcome, Stage, TornTail,
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
    #[error(
        "audit log {} is being written by another running rampart{}: two writers would break its chain; stop that \
         one, or give this instance its own `audit_log`",
        path.display(),
        holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
    )]
    InUse { path: PathBuf, holder: Option<i32> },
    #[error("cannot read the end of audit log {}: {source}", path.display())]
    ReadTail {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "audit log {} ends with a torn write ({length} bytes at offset {offset}) that cannot be moved aside to {}: \
         {source}; free space on its filesystem and start again (or truncate the log to {offset} bytes by hand, \
         after copying what follows)",
        path.display(),
        side.display()
    )]
    TornTailSave {
        path: PathBuf,
        side: PathBuf,
        offset: u64,
        length: u64,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the torn write at the end of audit log {} was copied to {}, but the record of its repair cannot be written \
         ({cause}); {aftermath}: free space on its filesystem and start again",
        path.display(),
        side.display()
    )]
    TornTailRecord {
        path: PathBuf,
        side: PathBuf,
        cause: String,
        /// What the file looks like now.
        aftermath: String,
    },
    #[error(
        "the last record of audit log {} is not an audit record ({reason}), nor is the line before it: this is more \
         than a torn write; run `rampart audit verify` on it and move it aside to start a new log",
        path.display()
    )]
    CorruptTail { path: PathBuf, reason: String },
    #[error(
        "audit log {} is format version {version}, this rampart writes version {FORMAT_VERSION}: rotate it away first",
        path.display()
    )]
    Version { path: PathBuf, version: u32 },
    #[error(
        "cannot write to audit log {}: {source}; the record was not written (the file still ends with its last \
         complete record), so the change must not be applied: free space on its filesystem (or fix the disk) and retry",
        path.display()
    )]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "audit log {} still holds part of a record whose write failed, from offset {offset}, and it cannot be cut \
         ({source}): nothing more is written until it can; fix the disk (every write retries the cut first)",
        path.display()
    )]
    Torn {
        path: PathBuf,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot rotate audit log {} to {}: {source}; it goes on in the current file: free space on its filesystem \
         (or fix the cause) and rotate again",
        path.display(),
        to.display()
    )]
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

/// Records that could not be written since the last one that was: what the next
/// `audit_write_failed` record says.
#[derive(Debug)]
struct FailedWrites {
    count: u64,
    /// Time of the first failure.
    since: String,
    first_error: String,
    last_error: String,
    /// `<stage> <action>` of the lost records, counted.
    lost: BTreeMap<String, u64>,
    /// When the last write failed: the timer retries at most every [`RETRY_INTERVAL`].
    last_attempt: Instant,
}

/// How often [`AuditLog::checkpoint_if_due`] tries again to write after a failure (a full
/// disk is not hammered with a write, a truncation and an fsync at every tick).
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Distinct kinds of lost records listed in an `audit_write_failed` record; more are counted
/// as `other`.
const MAX_LOST_KINDS: usize = 32;

/// Bytes reserved in a new file before a rotation writes anything, for its first records.
const ROTATION_RESERVE: i64 = 16 * 1024;

impl FailedWrites {
    fn message(&self, now: &str) -> String {
        let lost: Vec<String> = self.lost.iter().map(|(what, n)| format!("{what} x{n}")).collect();
        let last = if self.last_error == self.first_error {
            String::new()
        } else {
            format!("; last error: {}", self.last_error)
        };
        format!(
            "{} record(s) could not be written from {} to {now} and are not in this log: {}; first error: {}{last}. \
             The file was cut back after each failed write, so the chain continues here unbroken; a request whose \
             `received` record is among them was refused and changed nothing",
            self.count,
            self.since,
            lost.join(", "),
            self.first_error
        )
    }
}

/// How a lost checkpoint is listed in the `audit_write_failed` record (other records are
/// `<stage> <action>`).
fn lost_label(kind: CheckpointKind) -> String {
    format!("checkpoint ({})", kind.name())
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
    /// A failed write left bytes from this offset that could not be cut yet.
    torn_at: Option<u64>,
    /// Records lost since the last successful write.
    failed: Option<FailedWrites>,
    /// What [`AuditLog::open`] cut from the end of the file, if anything.
    repaired: Option<TornTail>,
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

/// Takes the writer's lock on a log file (an exclusive `flock`, held until the file is closed,
/// which a crash does too): one writer per file. Fails with `EWOULDBLOCK` when another open
/// file holds it.
fn lock_writer(file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // nix's `Flock` would panic in its destructor if unlocking failed; the lock is released
    // when the descriptor closes, so only the lock call is needed.
    // SAFETY: flock reads the descriptor number only, and `file` keeps it open for the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The pid that holds a `flock` on `file`, from /proc/locks (`1: FLOCK ADVISORY WRITE <pid>
/// <major>:<minor>:<inode> 0 EOF`).
fn lock_holder(file: &File) -> Option<i32> {
    use std::os::unix::fs::MetadataExt;
    let inode = file.metadata().ok()?.ino();
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) != Some(&"FLOCK") {
            return None;
        }
        let id = fields.get(5)?.rsplit(':').next()?.parse::<u64>().ok()?;
        (id == inode).then(|| fields.get(4)?.parse().ok())?
    })
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

/// The line whose newline is the byte before `end` (`end > 0`): its start offset and its
/// bytes without the newline.
fn line_ending_at(file: &mut File, end: u64) -> std::io::Result<(u64, Vec<u8>)> {
    let newline = end.saturating_sub(1);
    let start = rfind_newline(file, newline)?.map_or(0, |p| p + 1);
    let mut line = vec![0u8; usize::try_from(newline - start).unwrap_or(0)];
    file.seek(SeekFrom::Start(start))?;
    file.read_exact(&mut line)?;
    Ok((start, line))
}

/// The end of an existing file.
struct Tail {
    /// The last complete line before any torn write, without its newline.
    last: Option<Vec<u8>>,
    /// Offset and length of a torn write at the very end: a last line without its newline,
    /// or (when the file ends with a newline) a last line that is not an audit record.
    torn: Option<(u64, u64)>,
}

fn read_tail(file: &mut File, path: &Path) -> Result<Tail, AuditError> {
    let read_err = |source| AuditError::ReadTail {
        path: path.to_path_buf(),
        source,
    };
    let len = file.metadata().map_err(read_err)?.len();
    if len == 0 {
        return Ok(Tail { last: None, torn: None });
    }
    let mut byte = [0u8; 1];
    file.seek(SeekFrom::Start(len - 1)).map_err(read_err)?;
    file.read_exact(&mut byte).map_err(read_err)?;
    let mut end = len;
    let mut torn = None;
    if byte != [b'\n'] {
        let start = rfind_newline(file, len).map_err(read_err)?.map_or(0, |p| p + 1);
        torn = Some((start, len - start));
        end = start;
    }
    if end == 0 {
        return Ok(Tail { last: None, torn });
    }
    let (start, line) = line_ending_at(file, end).map_err(read_err)?;
    if torn.is_none() && serde_json::from_slice::<AuditRecord>(&line).is_err() {
        // Complete, but not a record: what a crash that lost a write's data can leave.
        torn = Some((start, len - start));
        if start == 0 {
            return Ok(Tail { last: None, torn });
        }
        let (_, before) = line_ending_at(file, start).map_err(read_err)?;
        return Ok(Tail {
            last: Some(before),
            torn,
        });
    }
    Ok(Tail { last: Some(line), torn })
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

/// The part of a side file's name after the log's name: `.torn-<UTC time>`. The verifier
/// recognizes side files by it.
pub const TORN_SUFFIX: &str = ".torn-";

/// Creates the side file for a torn tail of the log at `path`: `<name>.torn-<UTC time>`, with
/// `-<n>` added when that exists already.
fn create_side_file(path: &Path) -> std::io::Result<(PathBuf, String, File)> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now())
        .to_string()
        .replace(['-', ':'], "");
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut n = 0u32;
    loop {
        let side_name = if n == 0 {
            format!("{name}{TORN_SUFFIX}{stamp}")
        } else {
            format!("{name}{TORN_SUFFIX}{stamp}-{n}")
        };
        let side = dir.join(&side_name);
        match OpenOptions::new().write(true).create_new(true).mode(0o640).open(&side) {
            Ok(file) => return Ok((side, side_name, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Copies `length` bytes of `from` at `offset` to `to`; returns their SHA-256 and, when they
/// are short, the bytes themselves.
fn copy_range(
    from: &mut File,
    offset: u64,
    length: u64,
    to: &mut File,
) -> std::io::Result<([u8; 32], Option<Vec<u8>>)> {
    const KEEP: u64 = 64 * 1024;
    from.seek(SeekFrom::Start(offset))?;
    let mut hasher = Sha256::new();
    let mut kept = (length <= KEEP).then(Vec::new);
    let mut reader = from.take(length);
    let mut buf = vec![0u8; 64 * 1024];
    let mut copied = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let chunk = buf.get(..n).unwrap_or_default();
        hasher.update(chunk);
        to.write_all(chunk)?;
        if let Some(k) = kept.as_mut() {
            k.extend_from_slice(chunk);
        }
        copied += n as u64;
    }
    if copied != length {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("read {copied} of {length} bytes: the file shrank"),
        ));
    }
    Ok((hasher.finalize().into(), kept))
}

/// What cut bytes were, for the repair record.
fn describe_cut(bytes: Option<&[u8]>) -> String {
    match bytes.map(|b| serde_json::from_slice::<AuditRecord>(b.strip_suffix(b"\n").unwrap_or(b))) {
        Some(Ok(rec)) => format!(
            "they hold a whole record (seq {}, {} {}) whose write was never confirmed",
            rec.seq,
            rec.stage.name(),
            rec.action
        ),
        Some(Err(_)) => "they are not a whole record".into(),
        None => "they are too long to be one record".into(),
    }
}

impl AuditLog {
    /// Opens (or creates) the log at `path` and appends its `audit_opened` record, after an
    /// `audit_repaired` record when a torn write had to be cut from its end.
    pub fn open(path: &Path, options: AuditOptions) -> Result<AuditLog, AuditError> {
        let mut file = open_append(path).map_err(|source| AuditError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        match lock_writer(&file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(AuditError::InUse {
                    path: path.to_path_buf(),
                    holder: lock_holder(&file),
                });
            }
            Err(source) => {
                return Err(AuditError::Open {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
        let tail = read_tail(&mut file, path)?;
        let last = match tail.last {
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
            torn_at: None,
            failed: None,
            repaired: None,
        };
        if let Some((offset, length)) = tail.torn {
            log.cut_torn_tail(offset, length)?;
        }
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

    /// What [`AuditLog::open`] cut from the end of the file (a torn write), if anything.
    pub fn repaired(&self) -> Option<&TornTail> {
        self.repaired.as_ref()
    }

    /// How many records could not be written since the last one that was (they will be
    /// reported by the next `audit_write_failed` record).
    pub fn failed_writes(&self) -> u64 {
        self.failed.as_ref().map_or(0, |f| f.count)
    }

    /// Appends one record and fsyncs it. `Ok` means it is durable; on `Err` it is not in the
    /// file at all, and the caller must not apply the change it describes.
    pub fn append(&mut self, event: AuditEvent) -> Result<Appended, AuditError> {
        let label = format!("{} {}", event.stage.name(), event.action);
        let result = self.append_unnoted(event);
        if let Err(e) = &result {
            self.note_failure(label, e);
        }
        result
    }

    fn append_unnoted(&mut self, event: AuditEvent) -> Result<Appended, AuditError> {
        self.recover()?;
        if self
            .options
            .checkpoint_every
            .is_some_and(|every| self.since_checkpoint >= every.max(1))
        {
            self.checkpoint_noted(CheckpointKind::Count)?;
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
        if let Err(e) = self.recover() {
            self.note_failure(lost_label(CheckpointKind::Manual), &e);
            return Err(e);
        }
        self.checkpoint_noted(CheckpointKind::Manual)
    }

    /// Writes a time checkpoint when `checkpoint_interval` has passed since the last one and
    /// records were written since. Call it from a timer, with the current time. After failed
    /// writes it first tries (at most every second) to write their `audit_write_failed`
    /// record, so that the trail records the failure as soon as space returns, not only at
    /// the next request.
    pub fn checkpoint_if_due(&mut self, now: Instant) -> Result<Option<Appended>, AuditError> {
        if self
            .failed
            .as_ref()
            .is_some_and(|f| now.saturating_duration_since(f.last_attempt) < RETRY_INTERVAL)
        {
            return Ok(None);
        }
        self.recover()?;
        match self.options.checkpoint_interval {
            Some(interval)
                if self.since_checkpoint > 0 && now.saturating_duration_since(self.last_checkpoint) >= interval =>
            {
                self.checkpoint_noted(CheckpointKind::Time).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// Ends the log cleanly with a close checkpoint.
    pub fn close(mut self) -> Result<Appended, AuditError> {
        self.recover()?;
        self.write_checkpoint(CheckpointKind::Close)
    }

    /// Ends this file with a rotation checkpoint, renames it to `<path>.<n>` and continues the
    /// chain in a new file at `path`. Returns the rotated file's path. On error the log keeps
    /// writing where it was: the current file is unchanged when the new file cannot be made
    /// (a full disk is found out here, by reserving room in it), and ends with the rotation
    /// checkpoint when a later step failed (the checkpoint then simply sits mid-file).
    pub fn rotate(&mut self) -> Result<PathBuf, AuditError> {
        self.recover()?;
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
        let prepared = new_file
            .set_permissions(std::fs::Permissions::from_mode(0o640))
            .and_then(|()| lock_writer(&new_file))
            .and_then(|()| reserve(&new_file, ROTATION_RESERVE));
        if let Err(source) = prepared {
            let _ = std::fs::remove_file(&tmp);
            return Err(self.rotate_error(&rotated, source));
        }
        let checkpoint = match self.checkpoint_noted(CheckpointKind::Rotation) {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
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
        let (line, rec) = match self.encode(rec) {
            Ok(encoded) => encoded,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
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
            torn_tail: None,
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

    /// Writes one record durably, or not at all: after a failed write the file is cut back to
    /// the length it had before, so it always ends at a record boundary.
    fn write(&mut self, rec: AuditRecord) -> Result<Appended, AuditError> {
        self.cut_torn()?;
        let (line, rec) = self.encode(rec)?;
        let before = match self.file.metadata() {
            Ok(m) => m.len(),
            Err(source) => return Err(self.write_error(source)),
        };
        if let Err(source) = self.file.write_all(&line).and_then(|()| self.file.sync_data()) {
            if self.file.set_len(before).and_then(|()| self.file.sync_data()).is_err() {
                self.torn_at = Some(before);
            }
            return Err(self.write_error(source));
        }
        Ok(self.commit(&line, &rec))
    }

    fn write_error(&self, source: std::io::Error) -> AuditError {
        AuditError::Write {
            path: self.path.clone(),
            source,
        }
    }

    /// Cuts what an earlier failed write left, if its cut failed then.
    fn cut_torn(&mut self) -> Result<(), AuditError> {
        let Some(offset) = self.torn_at else {
            return Ok(());
        };
        self.file
            .set_len(offset)
            .and_then(|()| self.file.sync_data())
            .map_err(|source| AuditError::Torn {
                path: self.path.clone(),
                offset,
                source,
            })?;
        self.torn_at = None;
        Ok(())
    }

    /// Before a new record: cuts what a failed write left and, after failed writes, writes
    /// their `audit_write_failed` record.
    fn recover(&mut self) -> Result<(), AuditError> {
        self.cut_torn()?;
        let Some(failed) = &self.failed else {
            return Ok(());
        };
        let now = record::now_rfc3339();
        let mut rec = self.record(Stage::System, ACTION_WRITE_FAILED.into());
        rec.time = now.clone();
        rec.target = Some(self.path.display().to_string());
        rec.outcome = Some(Outcome::error("write_failed", failed.message(&now)));
        if let Err(e) = self.write(rec) {
            if let Some(f) = self.failed.as_mut() {
                f.last_attempt = Instant::now();
            }
            return Err(e);
        }
        self.failed = None;
        Ok(())
    }

    /// Writes a checkpoint, counting it as lost when it fails.
    fn checkpoint_noted(&mut self, kind: CheckpointKind) -> Result<Appended, AuditError> {
        let result = self.write_checkpoint(kind);
        if let Err(e) = &result {
            self.note_failure(lost_label(kind), e);
        }
        result
    }

    /// Counts one lost record for the next `audit_write_failed` record.
    fn note_failure(&mut self, what: String, error: &AuditError) {
        let cause = match error {
            AuditError::Write { source, .. } | AuditError::Torn { source, .. } => source.to_string(),
            other => other.to_string(),
        };
        let failed = self.failed.get_or_insert_with(|| FailedWrites {
            count: 0,
            since: record::now_rfc3339(),
            first_error: cause.clone(),
            last_error: String::new(),
            lost: BTreeMap::new(),
            last_attempt: Instant::now(),
        });
        failed.count += 1;
        failed.last_attempt = Instant::now();
        failed.last_error = cause;
        let key = if failed.lost.len() < MAX_LOST_KINDS || failed.lost.contains_key(&what) {
            what
        } else {
            "other".into()
        };
        *failed.lost.entry(key).or_insert(0) += 1;
    }

    /// Moves the torn write at `offset` (to the end of the file) to a side file, cuts it off
    /// and records the cut as the next record. If that record cannot be written, the bytes
    /// are put back.
    fn cut_torn_tail(&mut self, offset: u64, length: u64) -> Result<(), AuditError> {
        let (side, side_name, mut out) = match create_side_file(&self.path) {
            Ok(created) => created,
            Err(source) => {
                return Err(AuditError::TornTailSave {
                    side: PathBuf::from(format!("{}{TORN_SUFFIX}<time>", self.path.display())),
                    path: self.path.clone(),
                    offset,
                    length,
                    source,
                });
            }
        };
        let saved = copy_range(&mut self.file, offset, length, &mut out)
            .and_then(|copied| out.sync_all().map(|()| copied))
            .and_then(|copied| keys::sync_parent(&side).map(|()| copied));
        let (digest, kept) = match saved {
            Ok(copied) => copied,
            Err(source) => {
                // The log is untouched: the side file is not needed.
                let _ = std::fs::remove_file(&side);
                return Err(AuditError::TornTailSave {
                    path: self.path.clone(),
                    side,
                    offset,
                    length,
                    source,
                });
            }
        };
        if let Err(source) = self.file.set_len(offset) {
            let _ = std::fs::remove_file(&side);
            return Err(AuditError::TornTailSave {
                path: self.path.clone(),
                side,
                offset,
                length,
                source,
            });
        }
        if let Err(e) = self.file.sync_data() {
            // Cut, but perhaps not durably: the side file, durable already, keeps the bytes.
            return Err(AuditError::TornTailRecord {
                path: self.path.clone(),
                cause: e.to_string(),
                aftermath: format!(
                    "the log is cut at offset {offset} and the torn bytes are kept in {}",
                    side.display()
                ),
                side,
            });
        }
        let torn = TornTail {
            offset,
            length,
            sha256: hex::encode(digest),
            file: side_name,
        };
        let mut rec = self.record(Stage::System, ACTION_REPAIRED.into());
        rec.target = Some(self.path.display().to_string());
        rec.outcome = Some(Outcome {
            code: Some("torn_tail_cut".into()),
            ..Outcome::ok(format!(
                "a torn write was cut from the end of the log: {length} byte(s) from offset {offset}, sha256 {}, \
                 kept in {}; {}",
                torn.sha256,
                torn.file,
                describe_cut(kept.as_deref())
            ))
        });
        rec.torn_tail = Some(torn.clone());
        if let Err(e) = self.write(rec) {
            let aftermath = if self.torn_at.is_none() && self.restore_tail(&side, offset, length).is_ok() {
                let _ = std::fs::remove_file(&side);
                "the torn bytes were put back, the log is as it was".to_string()
            } else {
                format!(
                    "the log is cut at offset {offset} and the torn bytes are kept in {}",
                    side.display()
                )
            };
            return Err(AuditError::TornTailRecord {
                path: self.path.clone(),
                side,
                cause: e.to_string(),
                aftermath,
            });
        }
        self.repaired = Some(torn);
        Ok(())
    }

    /// Appends the side file's bytes back to the log, which ends at `offset`.
    fn restore_tail(&mut self, side: &Path, offset: u64, length: u64) -> std::io::Result<()> {
        let mut from = File::open(side)?;
        std::io::copy(&mut from, &mut self.file)?;
        self.file.sync_data()?;
        if self.file.metadata()?.len() != offset + length {
            return Err(std::io::Error::other("the log does not end where the torn bytes did"));
        }
        Ok(())
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

/// Reserves `len` bytes of disk beyond the end of `file` without changing its size, so that
/// the first writes to it cannot fail for lack of space. A filesystem that cannot reserve
/// space is not an error.
fn reserve(file: &File, len: i64) -> std::io::Result<()> {
    use nix::errno::Errno;
    use nix::fcntl::{FallocateFlags, fallocate};
    match fallocate(file, FallocateFlags::FALLOC_FL_KEEP_SIZE, 0, len) {
        Ok(()) | Err(Errno::EOPNOTSUPP) | Err(Errno::ENOSYS) => Ok(()),
        Err(e) => Err(std::io::Error::from(e)),
    }
}
