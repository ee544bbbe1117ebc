//! The verifier: reads audit files and reports every way they differ from what the writer wrote.
//!
//! Files may be given in any order. They are grouped by the log id of their first record (in
//! the order the log ids first appear) and sorted by their first `seq`, so `audit.log.*` in
//! shell order works. Then, in that order:
//!
//! **Per record** (each problem starts at the record's own seq):
//! - *malformed*: not a JSON audit record of format version 1, an invalid `prev`, or a
//!   checkpoint field on a non-checkpoint record (or the reverse). A malformed line takes the
//!   seq its position implies (the previous record's plus one).
//! - *modification* (with `--hmac-key`): the record has no MAC or no epoch, its `mac` is not
//!   the last field, or the MAC does not match the key **of the record's own epoch**, derived
//!   from the initial key. Epochs must start at 0 (at seq 0) and, between consecutive records,
//!   stay the same or grow by exactly one; a record whose epoch goes back or jumps ahead is a
//!   modification (someone holding a later key re-sealed it: the journald flaw CVE-2023-31439).
//! - *bad signature* (with `--pubkey`): a checkpoint without a signature, signed by another
//!   key, or whose Ed25519 signature over (log id, seq, prev, kind, time) does not verify.
//!
//! **Along the chain**, comparing each record with the previous well-formed one, `p`:
//! - expected: `seq = p.seq + 1` and `prev = hash(p)` (plus one seq per malformed line between
//!   them, whose hashes are unknown and whose links are therefore not checked);
//! - *modification*, seq consecutive but `prev` ≠ `hash(p)`: if the next record chains to this
//!   one, `p` was changed and the problem starts at `p.seq`; otherwise this record (its `prev`
//!   field at least) was changed and the problem starts at its own seq. A record that chains
//!   right after `p` by hash but carries another seq had its seq changed. Two records with the
//!   same seq: one of them was inserted or altered.
//! - *reordering*: a record whose seq is lower than expected, or whose `prev` is the hash of a
//!   record elsewhere in the files, or that skips seqs that do appear later (or earlier) in the
//!   files. Neighbouring out-of-order records are reported as one problem starting at the lowest
//!   seq involved.
//! - *deletion*: seqs skipped that appear nowhere in the files. The problem starts at the first
//!   missing seq. A chain whose first record is neither seq 0 nor an `audit_continued` record
//!   lost records from its head: a deletion that ends just before it.
//!
//! **At the ends** (what can be proven about what is missing after the last record):
//! - A file that is followed by another file of the same log must end with a rotation
//!   checkpoint. If it does not and the next file starts with seqs missing, the missing
//!   records were cut from the end of the first file: *truncation* at the first missing seq.
//!   (If it ends with a rotation checkpoint and seqs are missing, the head of the next file or a
//!   whole file went missing: a deletion.)
//! - The last record of a log must be a close checkpoint (a clean shutdown). A log that ends
//!   with a rotation checkpoint continues in a file that was not given: a warning. Any other
//!   last record is *truncation*: "possibly truncated after seq N", because records written
//!   after the last checkpoint are chained but not signed, and a cut there leaves a chain that
//!   is valid as far as it goes. For a log rampart is still writing, `--live` turns this into a
//!   warning.
//! - *torn tail*: the last line of a file has no newline, or is not an audit record: a write
//!   cut short (a crash, a full disk) or an edit. The finding gives its offset, length and
//!   line. With `--live`, at the end of the last file it is a warning (a record may be being
//!   written). `rampart start` moves such a tail to a side file and records the cut:
//! - An `audit_repaired` record says what a writer cut from the end of the file before it
//!   (offset, length, SHA-256, side file). It must sit at exactly that offset (else
//!   *modification*: bytes before it were added or removed), and its side file, looked up
//!   next to the file that holds the record, must hold exactly those bytes (else
//!   *modification*); a match, or a side file that cannot be read, is a warning naming the
//!   cut. Side files given among the files to verify (`audit.log.*` matches them) are
//!   recognized by their name, `<log>.torn-<time>`, and not read as logs.
//! - An `audit_opened` record with outcome code `unclean` means the writer restarted on a log
//!   that did not end with a close checkpoint: a crash, or records removed from the end while
//!   rampart was stopped. The records between the last checkpoint before it and the restart
//!   were never signed, so such a cut cannot be ruled out: a warning naming that range.
//!
//! Without `--pubkey`, checkpoints (including the close checkpoint) are not authenticated and
//! anyone able to edit the file could forge them; without `--hmac-key`, individual records are
//! authenticated only by the chain and the checkpoints. The summary says which checks ran.
//!
//! [`export`] writes the records that verify: well-formed, not part of any problem, and, with
//! `--pubkey`, covered by a later checkpoint whose signature verifies through an unbroken chain
//! (the unsigned tail is left out).

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, VerifyingKey};
use serde::Serialize;
use zeroize::Zeroizing;

use crate::keys::{self, KeyLadder};
use crate::record::{
    self, ACTION_CONTINUED, ACTION_OPENED, ACTION_REPAIRED, AuditRecord, CheckpointKind, FORMAT_VERSION, Stage,
};

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} changed while it was being exported: run the export again", path.display())]
    Changed { path: PathBuf },
}

/// What to check besides the chain.
#[derive(Default)]
pub struct VerifyOptions {
    /// The initial (epoch 0) HMAC key: every record must carry a valid MAC.
    pub hmac_key: Option<Zeroizing<[u8; 32]>>,
    /// The checkpoint key: every checkpoint must carry a valid signature.
    pub pubkey: Option<VerifyingKey>,
    /// The log is still being written: an open tail is a warning, not a truncation.
    pub live: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemClass {
    Modification,
    Deletion,
    Reordering,
    Truncation,
    /// The last line of a file is not a whole record: a write cut short.
    TornTail,
    BadSignature,
    Malformed,
}

impl ProblemClass {
    pub fn name(self) -> &'static str {
        match self {
            ProblemClass::Modification => "modification",
            ProblemClass::Deletion => "deletion",
            ProblemClass::Reordering => "reordering",
            ProblemClass::Truncation => "truncation",
            ProblemClass::TornTail => "torn tail",
            ProblemClass::BadSignature => "bad signature",
            ProblemClass::Malformed => "malformed record",
        }
    }
}

/// One finding. `seq` is where the problem starts; `file` and `line` where it was seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub class: ProblemClass,
    pub seq: Option<u64>,
    pub file: String,
    pub line: usize,
    pub message: String,
}

/// Something a reviewer should know that does not make the log invalid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Warning {
    pub seq: Option<u64>,
    pub file: String,
    pub line: usize,
    pub message: String,
}

#[derive(Debug, Clone, Copy)]
struct Meta {
    log: usize,
    seq: u64,
    prev: [u8; 32],
    kind: Option<CheckpointKind>,
    sig_ok: bool,
    epoch: Option<u64>,
    continued: bool,
    unclean_open: bool,
}

#[derive(Debug)]
struct Entry {
    file: usize,
    line: usize,
    /// Byte offset of the line in its file, and its length with the newline.
    offset: u64,
    length: u64,
    /// The last line of its file.
    last_in_file: bool,
    /// What the writer cut before this record (an `audit_repaired` record).
    torn_tail: Option<record::TornTail>,
    hash: [u8; 32],
    meta: Option<Meta>,
    malformed: Option<String>,
    /// The file's last line, without a newline.
    incomplete: bool,
    intrinsic: Vec<(ProblemClass, String)>,
    bad: bool,
    covered: bool,
    /// Seq as its position proves it, when the record's own seq field was changed.
    effective_seq: Option<u64>,
}

/// The result of a verification.
#[derive(Debug, Serialize)]
pub struct Report {
    pub valid: bool,
    pub files: Vec<String>,
    pub log_ids: Vec<String>,
    pub lines: u64,
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub checkpoints: u64,
    pub last_checkpoint_seq: Option<u64>,
    pub signatures_checked: bool,
    pub signatures_verified: u64,
    pub macs_checked: bool,
    pub macs_verified: u64,
    pub problems: Vec<Problem>,
    pub warnings: Vec<Warning>,
    pub summary: String,
    #[serde(skip)]
    entries: Vec<Entry>,
    #[serde(skip)]
    paths: Vec<PathBuf>,
}

impl Report {
    /// Problems per class, in class order.
    pub fn counts(&self) -> BTreeMap<ProblemClass, usize> {
        let mut counts = BTreeMap::new();
        for p in &self.problems {
            *counts.entry(p.class).or_insert(0) += 1;
        }
        counts
    }

    /// True when some problem of `class` starts at `seq`.
    pub fn has(&self, class: ProblemClass, seq: u64) -> bool {
        self.problems.iter().any(|p| p.class == class && p.seq == Some(seq))
    }

    fn make_summary(&self) -> String {
        let range = match (self.first_seq, self.last_seq) {
            (Some(a), Some(b)) => format!(" (seq {a}-{b})"),
            _ => String::new(),
        };
        let sigs = if self.signatures_checked {
            format!("{} signature(s) verified", self.signatures_verified)
        } else {
            "signatures not checked (no --pubkey)".into()
        };
        let macs = if self.macs_checked {
            format!("{} MAC(s) verified", self.macs_verified)
        } else {
            "MACs not checked (no --hmac-key)".into()
        };
        let verdict = if self.problems.is_empty() {
            "VALID".to_string()
        } else {
            let parts: Vec<String> = self
                .counts()
                .iter()
                .map(|(class, n)| format!("{n} {}", class.name()))
                .collect();
            format!("INVALID: {}", parts.join(", "))
        };
        format!(
            "{} file(s), {} record(s){range}, {} checkpoint(s), {sigs}, {macs}, {} warning(s): {verdict}",
            self.files.len(),
            self.records,
            self.checkpoints,
            self.warnings.len()
        )
    }
}

fn decode_hash(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if text.len() != 64 {
        return None;
    }
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

struct Checker<'a> {
    options: &'a VerifyOptions,
    ladder: Option<KeyLadder>,
    log_ids: Vec<String>,
    macs_verified: u64,
    signatures_verified: u64,
    checkpoints: u64,
}

impl Checker<'_> {
    fn log_index(&mut self, log_id: &str) -> usize {
        match self.log_ids.iter().position(|l| l == log_id) {
            Some(i) => i,
            None => {
                self.log_ids.push(log_id.to_string());
                self.log_ids.len() - 1
            }
        }
    }

    /// Checks what a record proves on its own: format, MAC, signature.
    fn entry(&mut self, file: usize, line_no: usize, offset: u64, line: &[u8], incomplete: bool) -> Entry {
        let mut entry = Entry {
            file,
            line: line_no,
            offset,
            length: line.len() as u64 + u64::from(!incomplete),
            last_in_file: false,
            torn_tail: None,
            hash: record::chain_hash(line),
            meta: None,
            malformed: None,
            incomplete,
            intrinsic: Vec::new(),
            bad: false,
            covered: false,
            effective_seq: None,
        };
        let rec: AuditRecord = match serde_json::from_slice(line) {
            Ok(r) => r,
            Err(e) => {
                entry.malformed = Some(format!("not an audit record: {e}"));
                return entry;
            }
        };
        let malformed = if rec.v != FORMAT_VERSION {
            Some(format!(
                "format version {} (this verifier reads {FORMAT_VERSION})",
                rec.v
            ))
        } else if (rec.stage == Stage::Checkpoint) != rec.checkpoint.is_some() {
            Some(
                "a checkpoint needs stage `checkpoint` and a `checkpoint` field, and only a checkpoint has them".into(),
            )
        } else if (rec.stage == Stage::System && rec.action == ACTION_REPAIRED) != rec.torn_tail.is_some() {
            Some(format!(
                "a `{ACTION_REPAIRED}` record needs stage `system` and a `torn_tail` field, and only it has them"
            ))
        } else if rec.torn_tail.as_ref().is_some_and(|t| !is_plain_file_name(&t.file)) {
            Some("the side file of `torn_tail` is not a plain file name".into())
        } else {
            None
        };
        let Some(prev) = decode_hash(&rec.prev) else {
            entry.malformed = Some(format!("`prev` is not 64 hex digits: `{}`", rec.prev));
            return entry;
        };
        if malformed.is_some() {
            entry.malformed = malformed;
            return entry;
        }
        let mut meta = Meta {
            log: self.log_index(&rec.log_id),
            seq: rec.seq,
            prev,
            kind: rec.checkpoint_kind(),
            sig_ok: false,
            epoch: rec.epoch,
            continued: rec.stage == Stage::System && rec.action == ACTION_CONTINUED,
            unclean_open: rec.stage == Stage::System
                && rec.action == ACTION_OPENED
                && rec.outcome.as_ref().and_then(|o| o.code.as_deref()) == Some("unclean"),
        };
        if let Some(ladder) = self.ladder.as_mut() {
            match check_mac(ladder, &rec, line) {
                Some(problem) => entry.intrinsic.push((ProblemClass::Modification, problem)),
                None => self.macs_verified += 1,
            }
        }
        if let Some(cp) = &rec.checkpoint {
            self.checkpoints += 1;
            if let Some(pubkey) = &self.options.pubkey {
                match check_signature(pubkey, &rec, cp) {
                    Ok(()) => {
                        meta.sig_ok = true;
                        self.signatures_verified += 1;
                    }
                    Err(problem) => entry.intrinsic.push((ProblemClass::BadSignature, problem)),
                }
            }
        }
        entry.meta = Some(meta);
        entry.torn_tail = rec.torn_tail;
        entry
    }
}

/// A name of a file in the log's own directory: no separator, not `.` or `..`.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

/// Whether `path` names a side file a writer made for a torn tail (`<log>.torn-<time>`):
/// such files hold the cut bytes, not records, and are checked against their repair record.
fn is_side_file(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().contains(crate::log::TORN_SUFFIX))
}

fn check_mac(ladder: &mut KeyLadder, rec: &AuditRecord, line: &[u8]) -> Option<String> {
    let Some(mac) = &rec.mac else {
        return Some("the record has no MAC, but an HMAC key was given".into());
    };
    let Some(epoch) = rec.epoch else {
        return Some("the record has a MAC but no epoch".into());
    };
    let Some((covered, _)) = record::split_mac(line) else {
        return Some("`mac` is not the last field of the line, as the writer puts it".into());
    };
    let Some(key) = ladder.key(epoch) else {
        return Some(format!(
            "epoch {epoch} is beyond what the verifier derives ({})",
            KeyLadder::MAX_EPOCH
        ));
    };
    let Ok(tag) = hex::decode(mac) else {
        return Some("the MAC is not hex".into());
    };
    if keys::check_record_mac(key, &covered, &tag) {
        None
    } else {
        Some(format!("the MAC does not match the key of its epoch {epoch}"))
    }
}

fn check_signature(pubkey: &VerifyingKey, rec: &AuditRecord, cp: &record::Checkpoint) -> Result<(), String> {
    let Some(sig) = &cp.sig else {
        return Err("the checkpoint is not signed".into());
    };
    let ours = hex::encode(pubkey.to_bytes());
    match &cp.pubkey {
        Some(theirs) if *theirs != ours => {
            return Err(format!(
                "the checkpoint was signed by key {theirs}, not by the --pubkey given"
            ));
        }
        _ => {}
    }
    let mut bytes = [0u8; 64];
    hex::decode_to_slice(sig, &mut bytes).map_err(|_| "the signature is not 64 bytes of hex".to_string())?;
    let message = record::checkpoint_message(&rec.log_id, rec.seq, &rec.prev, cp.kind, &rec.time);
    pubkey
        .verify_strict(&message, &Signature::from_bytes(&bytes))
        .map_err(|_| "the Ed25519 signature does not verify".to_string())
}

/// Reads one file into entries.
fn read_file(checker: &mut Checker<'_>, file: usize, path: &Path) -> Result<Vec<Entry>, VerifyError> {
    let read_err = |source| VerifyError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut reader = BufReader::new(File::open(path).map_err(read_err)?);
    let mut entries = Vec::new();
    let mut line = Vec::new();
    let mut line_no = 0;
    let mut offset = 0u64;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).map_err(read_err)?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let incomplete = line.last() != Some(&b'\n');
        if !incomplete {
            line.pop();
        }
        entries.push(checker.entry(file, line_no, offset, &line, incomplete));
        offset += n as u64;
    }
    if let Some(last) = entries.last_mut() {
        last.last_in_file = true;
    }
    Ok(entries)
}

/// The walk along the chain, over entries in verification order.
struct Walk<'a> {
    entries: Vec<Entry>,
    files: &'a [String],
    live: bool,
    macs_checked: bool,
    problems: Vec<Problem>,
    warnings: Vec<Warning>,
    /// (entry index, lowest seq involved) of out-of-order records.
    reordered: Vec<(usize, u64)>,
    by_hash: HashMap<[u8; 32], usize>,
    /// Entries per (log, seq), in order.
    by_seq: BTreeMap<(usize, u64), Vec<usize>>,
    last_checkpoint_seq: Option<u64>,
}

impl Walk<'_> {
    fn meta(&self, i: usize) -> Option<Meta> {
        self.entries.get(i).and_then(|e| e.meta)
    }

    fn hash(&self, i: usize) -> [u8; 32] {
        self.entries.get(i).map_or([0u8; 32], |e| e.hash)
    }

    fn seq(&self, i: usize) -> u64 {
        self.entries
            .get(i)
            .and_then(|e| e.effective_seq.or(e.meta.map(|m| m.seq)))
            .unwrap_or(0)
    }

    fn place(&self, i: usize) -> (String, usize) {
        match self.entries.get(i) {
            Some(e) => (self.files.get(e.file).cloned().unwrap_or_default(), e.line),
            None => (String::new(), 0),
        }
    }

    fn problem(&mut self, class: ProblemClass, seq: Option<u64>, at: usize, message: String) {
        let (file, line) = self.place(at);
        self.problems.push(Problem {
            class,
            seq,
            file,
            line,
            message,
        });
    }

    fn warn(&mut self, seq: Option<u64>, at: usize, message: String) {
        let (file, line) = self.place(at);
        self.warnings.push(Warning {
            seq,
            file,
            line,
            message,
        });
    }

    fn mark_bad(&mut self, i: usize) {
        if let Some(e) = self.entries.get_mut(i) {
            e.bad = true;
        }
    }

    fn file_name(&self, i: usize) -> String {
        self.place(i).0
    }

    /// The next well-formed entry after `i` in the same log.
    fn next_record(&self, i: usize, log: usize) -> Option<usize> {
        self.entries
            .iter()
            .enumerate()
            .skip(i + 1)
            .find(|(_, e)| e.meta.is_some())
            .filter(|(_, e)| e.meta.is_some_and(|m| m.log == log))
            .map(|(j, _)| j)
    }

    fn run(&mut self) {
        for (i, e) in self.entries.iter().enumerate() {
            if let Some(m) = e.meta {
                self.by_hash.entry(e.hash).or_insert(i);
                self.by_seq.entry((m.log, m.seq)).or_default().push(i);
            }
        }
        let mut p: Option<usize> = None;
        let mut malformed_run: u64 = 0;
        let mut last_cp: Option<u64> = None;
        for i in 0..self.entries.len() {
            let Some(entry) = self.entries.get(i) else { break };
            let (incomplete, malformed, intrinsic) =
                (entry.incomplete, entry.malformed.clone(), entry.intrinsic.clone());
            let torn = entry.last_in_file && (incomplete || entry.meta.is_none());
            let Some(m) = entry.meta else {
                let seq = p.map(|p| self.seq(p) + 1 + malformed_run);
                if torn {
                    self.torn_tail(i, seq, malformed.as_deref());
                } else {
                    self.problem(ProblemClass::Malformed, seq, i, malformed.unwrap_or_default());
                }
                self.mark_bad(i);
                malformed_run += 1;
                continue;
            };
            for (class, message) in intrinsic {
                self.problem(class, Some(m.seq), i, message);
                self.mark_bad(i);
            }
            if torn {
                self.torn_tail(i, Some(m.seq), None);
                self.mark_bad(i);
            }
            let chain_start = match p {
                None => true,
                Some(pi) => self.meta(pi).is_none_or(|pm| pm.log != m.log),
            };
            if chain_start {
                if let Some(pi) = p {
                    self.finish_chain(pi, last_cp, false);
                }
                self.start_chain(i, m);
                p = Some(i);
                malformed_run = 0;
                last_cp = m.kind.map(|_| m.seq);
                continue;
            }
            let Some(pi) = p else { continue };
            let Some(pm) = self.meta(pi) else { continue };
            let boundary = self.entries.get(pi).map(|e| e.file) != self.entries.get(i).map(|e| e.file);
            let p_seq = self.seq(pi);
            let expected = p_seq + 1 + malformed_run;
            let linked = m.prev == self.hash(pi);
            if malformed_run == 0 && linked && m.seq != expected {
                // Its position is proven by the hash link: the seq field was changed.
                self.problem(
                    ProblemClass::Modification,
                    Some(expected),
                    i,
                    format!(
                        "this record says seq {} but chains right after seq {p_seq}: its seq was changed",
                        m.seq
                    ),
                );
                self.mark_bad(i);
                if let Some(e) = self.entries.get_mut(i) {
                    e.effective_seq = Some(expected);
                }
                if let Some(v) = self.by_seq.get_mut(&(m.log, m.seq)) {
                    v.retain(|&x| x != i);
                }
                self.by_seq.entry((m.log, expected)).or_default().push(i);
            } else if let Some(first) = self
                .by_seq
                .get(&(m.log, m.seq))
                .and_then(|v| v.first())
                .copied()
                .filter(|&f| f != i)
            {
                // Two records with one seq: the later one is the odd one out.
                let (_, first_line) = self.place(first);
                let message = if self.hash(first) == self.hash(i) {
                    format!("seq {} appears twice: this line repeats line {first_line}", m.seq)
                } else {
                    format!(
                        "two different records claim seq {} (the other is at line {first_line})",
                        m.seq
                    )
                };
                self.problem(ProblemClass::Modification, Some(m.seq), i, message);
                self.mark_bad(i);
                continue;
            } else if m.seq == expected {
                if malformed_run == 0 {
                    self.check_epochs(i, pm, m);
                }
                if malformed_run > 0 || linked || self.entries.get(pi).is_some_and(|e| e.bad) {
                    // Explained by malformed lines already reported, or intact.
                } else if let Some(&j) = self.by_hash.get(&m.prev).filter(|&&j| j != pi) {
                    let other = self.seq(j);
                    self.reordered.push((i, m.seq.min(other)));
                } else {
                    self.broken_link(pi, p_seq, i, m);
                }
                if boundary && linked && pm.kind != Some(CheckpointKind::Rotation) {
                    let prev_file = self.file_name(pi);
                    self.warn(
                        Some(p_seq),
                        i,
                        format!("{prev_file} does not end with a rotation checkpoint, though the log continues here"),
                    );
                }
            } else if m.seq < expected {
                // A record from earlier in the chain: the next one is compared with `p` still.
                self.reordered.push((i, m.seq));
                continue;
            } else {
                self.gap(pi, pm, i, m, expected, boundary);
            }
            if m.unclean_open {
                let since = last_cp.map_or("the start of the log".to_string(), |s| {
                    format!("the checkpoint at seq {s}")
                });
                self.warn(
                    Some(m.seq),
                    i,
                    format!(
                        "rampart restarted here after an unclean shutdown: records after {since} up to seq {} were \
                         never signed, so records cut from the end before the restart would not show",
                        m.seq.saturating_sub(1)
                    ),
                );
            }
            if m.kind.is_some() {
                last_cp = Some(m.seq);
            }
            p = Some(i);
            malformed_run = 0;
        }
        if let Some(pi) = p {
            self.finish_chain(pi, last_cp, true);
        }
        self.report_reorderings();
    }

    /// The last line of a file is not a whole record (`malformed` says why, when it is not
    /// one at all; none: a record without its newline).
    fn torn_tail(&mut self, i: usize, seq: Option<u64>, malformed: Option<&str>) {
        let Some(e) = self.entries.get(i) else { return };
        let (offset, length, line, incomplete) = (e.offset, e.length, e.line, e.incomplete);
        let in_last_file = self.entries.last().map(|l| l.file) == Some(e.file);
        let what = match (incomplete, malformed) {
            (true, Some(_)) => "are part of a record: the line has no newline and does not parse".to_string(),
            (true, None) => "are a record without its newline".to_string(),
            (false, reason) => format!("are not an audit record ({})", reason.unwrap_or_default()),
        };
        let place = format!("its last {length} byte(s), from offset {offset} (line {line}), {what}");
        if self.live && in_last_file {
            self.warn(
                seq,
                i,
                format!("the file ends with a record still being written, or with a torn write: {place}"),
            );
        } else {
            self.problem(
                ProblemClass::TornTail,
                seq,
                i,
                format!(
                    "the file ends with a torn write: {place}; a write was cut short (a crash, a full disk) or the \
                     file was edited. `rampart start` moves such a tail to a side file and records the cut"
                ),
            );
        }
    }

    /// Checks every `audit_repaired` record against the file it sits in and the side file it
    /// names (in the directory of `paths[file]`). `side_files`: side files given on the
    /// command line, which should each be named by a repair record.
    fn check_repairs(&mut self, paths: &[PathBuf], side_files: &[PathBuf]) {
        let mut named = Vec::new();
        for i in 0..self.entries.len() {
            let Some(e) = self.entries.get(i) else { break };
            let Some(torn) = e.torn_tail.clone() else { continue };
            let (seq, offset) = (e.meta.map(|m| m.seq), e.offset);
            let dir = paths
                .get(e.file)
                .and_then(|p| p.parent())
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let side = dir.join(&torn.file);
            named.push(std::fs::canonicalize(&side).unwrap_or_else(|_| side.clone()));
            let cut = format!(
                "{} byte(s) from offset {} (sha256 {}), kept in {}",
                torn.length,
                torn.offset,
                torn.sha256,
                side.display()
            );
            if offset != torn.offset {
                self.problem(
                    ProblemClass::Modification,
                    seq,
                    i,
                    format!(
                        "this repair record says the torn write it cut began at offset {}, but the record sits at \
                         offset {offset}: bytes before it were added or removed",
                        torn.offset
                    ),
                );
                self.mark_bad(i);
                continue;
            }
            match hash_file(&side) {
                Ok((length, digest)) if length == torn.length && hex::encode(digest) == torn.sha256 => self.warn(
                    seq,
                    i,
                    format!("rampart cut a torn write from the end of the file here: {cut}, which holds exactly them"),
                ),
                Ok((length, digest)) => {
                    self.problem(
                        ProblemClass::Modification,
                        seq,
                        i,
                        format!(
                            "the side file {} holds {length} byte(s) with sha256 {}, but this repair record says it \
                             cut {} byte(s) with sha256 {}: one of them was changed",
                            side.display(),
                            hex::encode(digest),
                            torn.length,
                            torn.sha256
                        ),
                    );
                    self.mark_bad(i);
                }
                Err(e) => self.warn(
                    seq,
                    i,
                    format!(
                        "rampart cut a torn write from the end of the file here: {cut}; that file cannot be read \
                         ({e}), so the cut bytes were not checked"
                    ),
                ),
            }
        }
        for side in side_files {
            let canonical = std::fs::canonicalize(side).unwrap_or_else(|_| side.clone());
            if !named.contains(&canonical) {
                self.warnings.push(Warning {
                    seq: None,
                    file: side.display().to_string(),
                    line: 0,
                    message: "a torn-write side file that no repair record in the given files names: not checked"
                        .into(),
                });
            }
        }
    }

    fn start_chain(&mut self, i: usize, m: Meta) {
        if m.seq == 0 {
            if m.prev != [0u8; 32] {
                self.problem(
                    ProblemClass::Modification,
                    Some(0),
                    i,
                    "the first record's prev is not the genesis value (all zeros)".into(),
                );
                self.mark_bad(i);
            }
            if self.macs_checked && m.epoch.is_some_and(|e| e != 0) {
                self.problem(
                    ProblemClass::Modification,
                    Some(0),
                    i,
                    "the first record of a log must be in HMAC epoch 0".into(),
                );
                self.mark_bad(i);
            }
        } else if m.continued {
            let file = self.file_name(i);
            self.warn(
                Some(m.seq),
                i,
                format!(
                    "{file} continues a file that was not given: records before seq {} were not checked",
                    m.seq
                ),
            );
        } else {
            let file = self.file_name(i);
            self.problem(
                ProblemClass::Deletion,
                Some(m.seq - 1),
                i,
                format!(
                    "records up to seq {} are missing: {file} starts at seq {} and its first record is not an \
                     `{ACTION_CONTINUED}` record (records were removed from its head, or an earlier file is missing)",
                    m.seq - 1,
                    m.seq
                ),
            );
        }
    }

    fn check_epochs(&mut self, i: usize, pm: Meta, m: Meta) {
        if !self.macs_checked {
            return;
        }
        if let (Some(a), Some(b)) = (pm.epoch, m.epoch) {
            let message = if b < a {
                format!("its HMAC epoch goes back from {a} to {b}")
            } else if b > a + 1 {
                format!("its HMAC epoch jumps from {a} to {b}: sealed with a later epoch's key")
            } else {
                return;
            };
            self.problem(ProblemClass::Modification, Some(m.seq), i, message);
            self.mark_bad(i);
        }
    }

    /// Consecutive seqs whose hash link is broken: which record changed?
    fn broken_link(&mut self, pi: usize, p_seq: u64, i: usize, m: Meta) {
        let hash_i = self.hash(i);
        let next_chains = self
            .next_record(i, m.log)
            .and_then(|n| self.meta(n))
            .is_some_and(|n| n.prev == hash_i && n.seq == m.seq + 1);
        if next_chains {
            self.problem(
                ProblemClass::Modification,
                Some(p_seq),
                pi,
                format!(
                    "this record's hash does not match the prev recorded by seq {}: it was changed",
                    m.seq
                ),
            );
            self.mark_bad(pi);
        } else {
            self.problem(
                ProblemClass::Modification,
                Some(m.seq),
                i,
                format!(
                    "this record's prev does not match seq {p_seq}, and the next record does not chain to it: it was \
                     changed (or seq {p_seq} was, too)"
                ),
            );
            self.mark_bad(i);
        }
    }

    /// Seqs skipped between `pi` and `i`.
    fn gap(&mut self, pi: usize, pm: Meta, i: usize, m: Meta, expected: u64, boundary: bool) {
        let missing = m.seq - expected;
        let present: Vec<u64> = self
            .by_seq
            .range((m.log, expected)..(m.log, m.seq))
            .map(|((_, s), _)| *s)
            .collect();
        let elsewhere = self.by_hash.get(&m.prev).is_some_and(|&j| j != pi);
        if !present.is_empty() || elsewhere {
            let low = present.first().copied().unwrap_or(m.seq).min(m.seq);
            self.reordered.push((i, low));
        }
        let absent = missing - present.len() as u64;
        if absent == 0 {
            return;
        }
        let range = if missing == 1 {
            format!("seq {expected} is")
        } else if absent == missing {
            format!("seq {expected}-{} are", m.seq - 1)
        } else {
            format!("{absent} of seq {expected}-{} are", m.seq - 1)
        };
        if boundary && pm.kind != Some(CheckpointKind::Rotation) {
            let prev_file = self.file_name(pi);
            let file = self.file_name(i);
            self.problem(
                ProblemClass::Truncation,
                Some(expected),
                pi,
                format!(
                    "{prev_file} ends at seq {} without a rotation checkpoint and {file} continues at seq {}: {range} \
                     missing, cut from the end of {prev_file}",
                    pm.seq, m.seq
                ),
            );
        } else {
            self.problem(
                ProblemClass::Deletion,
                Some(expected),
                i,
                format!("records {range} missing"),
            );
        }
    }

    fn finish_chain(&mut self, last: usize, last_cp: Option<u64>, final_chain: bool) {
        let Some(m) = self.meta(last) else { return };
        self.last_checkpoint_seq = last_cp.or(self.last_checkpoint_seq);
        match m.kind {
            Some(CheckpointKind::Close) => {}
            Some(CheckpointKind::Rotation) => {
                self.warn(
                    Some(m.seq),
                    last,
                    format!("the log continues after seq {} in a file that was not given", m.seq),
                );
            }
            _ => {
                let cp = last_cp.map_or("no checkpoint at all".into(), |s| format!("last checkpoint at seq {s}"));
                if final_chain && self.live {
                    self.warn(
                        Some(m.seq),
                        last,
                        format!("open tail: records after the {cp} are chained but not signed yet"),
                    );
                } else {
                    self.problem(
                        ProblemClass::Truncation,
                        Some(m.seq),
                        last,
                        format!(
                            "possibly truncated after seq {}: the log does not end with a close checkpoint ({cp}); \
                             if rampart is still writing it, verify with --live",
                            m.seq
                        ),
                    );
                }
            }
        }
    }

    fn report_reorderings(&mut self) {
        let mut flags = std::mem::take(&mut self.reordered);
        flags.sort_unstable();
        let mut regions: Vec<Vec<(usize, u64)>> = Vec::new();
        for flag in flags {
            match regions.last_mut() {
                Some(region) if region.last().is_some_and(|(j, _)| flag.0 <= j + 2) => region.push(flag),
                _ => regions.push(vec![flag]),
            }
        }
        for region in regions {
            let Some(&(first, _)) = region.first() else { continue };
            let low = region.iter().map(|(_, s)| *s).min();
            let seqs: Vec<String> = region.iter().take(10).map(|(i, _)| self.seq(*i).to_string()).collect();
            let (_, last_line) = region.last().map(|(i, _)| self.place(*i)).unwrap_or_default();
            self.problem(
                ProblemClass::Reordering,
                low,
                first,
                format!(
                    "records are out of order up to line {last_line}: seq {}{} where the chain expects them sorted",
                    seqs.join(", "),
                    if region.len() > 10 { ", ..." } else { "" }
                ),
            );
            for (i, _) in region {
                self.mark_bad(i);
            }
        }
    }

    /// Marks the records a verified checkpoint vouches for, through unbroken links.
    fn mark_covered(&mut self) {
        let mut covered = false;
        let mut next: Option<usize> = None;
        for i in (0..self.entries.len()).rev() {
            let Some(e) = self.entries.get(i) else { continue };
            let Some(m) = e.meta else {
                covered = false;
                next = None;
                continue;
            };
            let linked = next
                .and_then(|n| self.meta(n))
                .is_some_and(|n| n.log == m.log && n.seq == m.seq + 1 && n.prev == e.hash);
            covered = if e.bad {
                false
            } else if m.sig_ok {
                true
            } else {
                covered && linked
            };
            if let Some(e) = self.entries.get_mut(i) {
                e.covered = covered;
            }
            next = Some(i);
        }
    }
}

/// Length and SHA-256 of a file.
fn hash_file(path: &Path) -> std::io::Result<(u64, [u8; 32])> {
    use sha2::Digest;
    let mut file = File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let length = std::io::copy(&mut file, &mut hasher)?;
    Ok((length, hasher.finalize().into()))
}

/// Verifies `paths` as one or more logs. Side files of torn writes (`<log>.torn-<time>`) among
/// them are not read as logs: each is checked against the repair record that names it.
pub fn verify(paths: &[PathBuf], options: &VerifyOptions) -> Result<Report, VerifyError> {
    let (side_files, paths): (Vec<PathBuf>, Vec<PathBuf>) = paths.iter().cloned().partition(|p| is_side_file(p));
    let mut checker = Checker {
        options,
        ladder: options.hmac_key.clone().map(KeyLadder::new),
        log_ids: Vec::new(),
        macs_verified: 0,
        signatures_verified: 0,
        checkpoints: 0,
    };
    let mut per_file: Vec<(PathBuf, Vec<Entry>)> = Vec::new();
    for (i, path) in paths.iter().enumerate() {
        per_file.push((path.clone(), read_file(&mut checker, i, path)?));
    }
    // Group by log (in order of first appearance), then by first seq.
    per_file.sort_by_key(|(_, entries)| {
        entries
            .iter()
            .find_map(|e| e.meta)
            .map_or((usize::MAX, u64::MAX), |m| (m.log, m.seq))
    });
    let mut files = Vec::new();
    let mut ordered_paths = Vec::new();
    let mut entries = Vec::new();
    for (index, (path, file_entries)) in per_file.into_iter().enumerate() {
        files.push(path.display().to_string());
        ordered_paths.push(path);
        entries.extend(file_entries.into_iter().map(|mut e| {
            e.file = index;
            e
        }));
    }
    let mut walk = Walk {
        entries,
        files: &files,
        live: options.live,
        macs_checked: options.hmac_key.is_some(),
        problems: Vec::new(),
        warnings: Vec::new(),
        reordered: Vec::new(),
        by_hash: HashMap::new(),
        by_seq: BTreeMap::new(),
        last_checkpoint_seq: None,
    };
    walk.run();
    walk.check_repairs(&ordered_paths, &side_files);
    walk.mark_covered();
    let Walk {
        entries,
        mut problems,
        warnings,
        last_checkpoint_seq,
        ..
    } = walk;
    problems.sort_by_key(|p| (p.seq.unwrap_or(u64::MAX), p.class));
    let seqs = entries.iter().filter_map(|e| e.meta.map(|m| m.seq));
    let mut report = Report {
        valid: problems.is_empty(),
        lines: entries.len() as u64,
        records: entries.iter().filter(|e| e.meta.is_some()).count() as u64,
        first_seq: seqs.clone().min(),
        last_seq: seqs.max(),
        files,
        log_ids: checker.log_ids,
        checkpoints: checker.checkpoints,
        last_checkpoint_seq,
        signatures_checked: options.pubkey.is_some(),
        signatures_verified: checker.signatures_verified,
        macs_checked: options.hmac_key.is_some(),
        macs_verified: checker.macs_verified,
        problems,
        warnings,
        summary: String::new(),
        entries,
        paths: ordered_paths,
    };
    report.summary = report.make_summary();
    Ok(report)
}

/// What [`export`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    pub written: u64,
    pub left_out: u64,
}

/// Writes the lines of the records that verify (see the module documentation) to `out`, a new
/// file (mode 0640), in verification order and byte for byte.
pub fn export(report: &Report, out: &Path, require_signature: bool) -> Result<Exported, VerifyError> {
    let write_err = |source| VerifyError::Write {
        path: out.to_path_buf(),
        source,
    };
    let mut writer = std::io::BufWriter::new(
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(out)
            .map_err(write_err)?,
    );
    let mut result = Exported {
        written: 0,
        left_out: 0,
    };
    let mut entries = report.entries.iter().peekable();
    for (index, path) in report.paths.iter().enumerate() {
        let read_err = |source| VerifyError::Read {
            path: path.clone(),
            source,
        };
        let mut reader = BufReader::new(File::open(path).map_err(read_err)?);
        let mut line = Vec::new();
        while let Some(entry) = entries.next_if(|e| e.file == index) {
            line.clear();
            reader.read_until(b'\n', &mut line).map_err(read_err)?;
            let body = line.strip_suffix(b"\n").unwrap_or(&line);
            if record::chain_hash(body) != entry.hash {
                return Err(VerifyError::Changed { path: path.clone() });
            }
            let good = entry.meta.is_some() && !entry.bad && !entry.incomplete && (!require_signature || entry.covered);
            if good {
                writer.write_all(body).map_err(write_err)?;
                writer.write_all(b"\n").map_err(write_err)?;
                result.written += 1;
            } else {
                result.left_out += 1;
            }
        }
    }
    writer
        .into_inner()
        .map_err(|e| write_err(e.into_error()))?
        .sync_all()
        .map_err(write_err)?;
    Ok(result)
}
