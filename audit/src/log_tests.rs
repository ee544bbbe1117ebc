//! Writer and verifier together: every kind of tampering must be found, and an untouched log
//! must verify clean.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use rampart_command::proto::{self, request::Kind};
use zeroize::Zeroizing;

use crate::cli::{self, AuditCommand, KeyArgs, VerifyArgs};
use crate::keys::{self, KeyLadder};
use crate::record::{self, Actor, AuditEvent, AuditRecord, CheckpointKind, Outcome, Stage};
use crate::verify::{self, ProblemClass, Report, VerifyOptions};
use crate::{AuditError, AuditLog, AuditOptions};

struct Keys {
    seed: PathBuf,
    public: VerifyingKey,
    hmac: PathBuf,
    initial: Zeroizing<[u8; 32]>,
}

fn keys(dir: &Path) -> Keys {
    let seed = dir.join("sign.key");
    let public = keys::generate_signing_key(&seed).unwrap();
    let hmac = dir.join("hmac.key");
    let initial = keys::generate_hmac_key(&hmac).unwrap();
    Keys {
        seed,
        public,
        hmac,
        initial,
    }
}

fn options(k: &Keys, hmac: bool) -> AuditOptions {
    AuditOptions {
        signing_key: Some(k.seed.clone()),
        checkpoint_every: Some(5),
        checkpoint_interval: None,
        hmac_key: hmac.then(|| k.hmac.clone()),
        epoch_records: 3,
        syslog: None,
    }
}

fn actor() -> Actor {
    Actor {
        uid: 1000,
        gid: 1000,
        pid: 4242,
        user: Some("alice".into()),
        process: Some("rampart".into()),
        role: Some("operator".into()),
    }
}

fn add_cluster(i: usize) -> proto::Request {
    proto::Request {
        id: format!("req-{i}"),
        kind: Some(Kind::AddCluster(proto::Cluster {
            cluster_id: format!("c{i}"),
            ..Default::default()
        })),
    }
}

/// Received + completed for `n` requests.
fn requests(log: &mut AuditLog, from: usize, n: usize) {
    for i in from..from + n {
        let r = add_cluster(i);
        let received = log
            .append(AuditEvent::received(actor(), &r, Some("aa".repeat(32))))
            .unwrap();
        log.append(AuditEvent::completed(
            actor(),
            &r,
            received.seq,
            Outcome::ok("added"),
            Some("aa".repeat(32)),
            Some("bb".repeat(32)),
        ))
        .unwrap();
    }
}

/// A closed log of `n` requests.
fn closed_log(dir: &Path, k: &Keys, hmac: bool, n: usize) -> PathBuf {
    let path = dir.join("audit.log");
    let mut log = AuditLog::open(&path, options(k, hmac)).unwrap();
    requests(&mut log, 0, n);
    log.close().unwrap();
    path
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn put(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).unwrap();
}

fn rec(line: &str) -> AuditRecord {
    serde_json::from_str(line).unwrap()
}

/// Index of the line holding `seq`.
fn at(lines: &[String], seq: u64) -> usize {
    lines.iter().position(|l| rec(l).seq == seq).unwrap()
}

/// Changes one byte of a request record (the first letter of its cluster id in `target`).
fn tamper(line: &str) -> String {
    const FROM: &str = "\"target\":\"cluster c";
    assert!(line.contains(FROM), "{line}");
    line.replacen(FROM, "\"target\":\"cluster x", 1)
}

fn check<P: AsRef<Path>>(paths: &[P], k: &Keys, hmac: bool) -> Report {
    let paths: Vec<PathBuf> = paths.iter().map(|p| p.as_ref().to_path_buf()).collect();
    verify::verify(
        &paths,
        &VerifyOptions {
            hmac_key: hmac.then(|| k.initial.clone()),
            pubkey: Some(k.public),
            live: false,
        },
    )
    .unwrap()
}

fn classes(report: &Report) -> Vec<(ProblemClass, Option<u64>)> {
    report.problems.iter().map(|p| (p.class, p.seq)).collect()
}

#[test]
fn an_untouched_log_verifies_clean() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path());
    let path = closed_log(dir.path(), &k, true, 10);
    let report = check(&[&path], &k, true);
    assert!(report.valid, "{:#?}", report.problems);
    assert!(report.warnings.is_empty(), "{:#?}", report.warnings);
    assert_eq!(report.records, lines(&path).len() as u64);
    assert_eq!(report.macs_verified, report.records);
    // Count checkpoints every 5 records, plus the close checkpoint.
    assert!(report.checkpoints >= 4, "{}", report.summary);
    assert_eq!(report.signatures_verified, report.checkpoints);
    assert!(report.summary.ends_with("VALID"), "{}", report.summary);
    let last = rec(lines(&path).last().unwrap());
    assert_eq!(last.checkpoint_kind(), Some(CheckpointKind::Close));
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o640);
}

#[test]
fn a_changed_byte_is_a_modification_at_that_seq() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path());
    let path = closed_log(dir.path(), &k, false, 6);
    let original = lines(&path);
    for seq in [3u64, 8] {
        let mut l = original.clone();
        let i = at(&l, seq);
        l[i] = tamper(&l[i]);
        put(&path, &l);
        let report = check(&[&path], &k, false);
        assert_eq!(
            classes(&report),
            [(ProblemClass::Modification, Some(seq))],
            "{report:#?}"
        );
    }
    // A change inside the prev field blames the record that holds it.
    let mut l = original.clone();
    let i = at(&l, 4);
    let prev = rec(&l[i]).prev;
    let flipped = format!("{}{}", if prev.starts_with('0') { '1' } else { '0' }, &prev[1..]);
    l[i] = l[i].replace(&prev, &flipped);
    put(&path, &l);
    let report = check(&[&path], &k, false);
    assert_eq!(classes(&report), [(ProblemClass::Modification, Some(4))], "{report:#?}");
    // With MACs the changed record is named by its own MAC.
    let path = dir.path().join("mac").join("audit.log");
    std::fs::create_dir(path.parent().unwrap()).unwrap();
    let k2 = keys(path.parent().unwrap());
    let mut log = AuditLog::open(&path, options(&k2, true)).unwrap();
    requests(&mut log, 0, 4);
    log.close().unwrap();
    let mut l = lines(&path);
    let i = at(&l, 3);
    l[i] = tamper(&l[i]);
    put(&path, &l);
    let report = check(&[&path], &k2, true);
    assert_eq!(classes(&report), [(ProblemClass::Modification, Some(3))], "{report:#?}");
    assert!(report.problems.iter().any(|p| p.message.contains("MAC")), "{report:#?}");
}

#[test]
fn a_deleted_record_is_a_deletion() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path());
    let path = closed_log(dir.path(), &k, false, 6);
    let mut l = lines(&path);
    let i = at(&l, 7);
    l.remove(i);
    put(&path, &l);
    let report = check(&[&path], &k, false);
    assert_eq!(classes(&report), [(ProblemClass::Deletion, Some(7))], "{report:#?}");

    // Several in a row, and the head of the log.
    let path = closed_log(&dir.path().join("x").tap_mkdir(), &k, false, 6);
    let mut l = lines(&path);
    l.drain(at(&l, 3)..=at(&l, 5));
    l.remove(0);
    put(&path, &l);
    let report = check(&[&path], &k, false);
    assert!(report.has(ProblemClass::Deletion, 3), "{report:#?}");
    assert!(report.has(ProblemClass::Deletion, 0), "{report:#?}");
    assert!(
        report.problems.iter().any(|p| p.message.contains("seq 3-5")),
        "{report:#?}"
    );
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

#[test]
fn swapped_records_are_a_reordering() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path());
    let path = closed_log(dir.path(), &k, false, 6);
    let mut l = lines(&path);
    let i = at(&l, 6);
    l.swap(i, i + 1);
    put(&path, &l);
    let report = check(&[&path], &k, false);
    assert_eq!(classes(&report), [(ProblemClass::Reordering, Some(6))], "{report:#?}");

    // A record moved far away.
    let mut l = lines(&path);
    l.swap(i, i + 1);
    let moved = l.remove(at(&l, 2));
    l.insert(at(&l, 10), moved);
    put(&path, &l);
    let report = check(&[&path], &k, false);
    assert!(!report.valid);
    assert!(
        report.problems.iter().all(|p| p.class == ProblemClass::Reordering),
        "{report:#?}"
    );
    assert_eq!(report.problems.first().and_then(|p| p.seq), Some(2), "{report:#?}");
}

#[test]
fn a_cut_tail_is_a_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path());
    let path = closed_log(dir.path(), &k, false, 8);
    let mut l = lines(&path);
    // Cut right after the second count checkpoint: the chain is intact but unfinished.
    let cp = l
        .iter()
        .filter(|x| rec(x).checkpoint_kind() == Some(CheckpointKind::Count))
        .nth(1)
        .map(|x| rec(x).seq)
        .unwrap();
    l.truncate(at(&l, cp) + 1);
    put(&path, &l);
    let report = check(&[&path], &k, false);
    assert_eq!(classes(&report), [(ProblemClass::Truncation, Some(cp))], "{report:#?}");
    assert!(report.problems[0].message.contains("possibly truncated after seq"));
    // A log still being written may end anywhere.
    let live = verify::verify(
        std::slice::from_ref(&path),
        &VerifyOptions {
            live: true,
            ..VerifyOptions::default()
        },
    )
    .unwrap();
    assert!(live.valid && !live.warnings.is_empty(), "{live:#?}");

    // A cut inside the last line: a torn tail where that record was, and the chain before it
    // does not end with a close checkpoint.
    let mut text = std::fs::read(&path).unwrap();
    text.truncate(text.len() - 10);
    std::fs::write(&path, &text).unwrap();
    let report = check(&[&path], &k, false);
    assert!(report.has(ProblemClass::TornTail, cp), "{report:#?}");
    assert!(report.has(ProblemClass::Truncation, cp - 1), "{report:#?}");
    // The writer cuts such a tail aside and continues after the last whole record.
    let before: usize = l[..l.len() - 1].iter().map(|x| x.len() + 1).sum();
    let log = AuditLog::open(&path, options(&k, false)).unwrap();
    assert_eq!(log.repaired().map(|t| t.offset), Some(before as u64));
    assert_eq!(log.next_seq(), cp + 2);
}

#[test]
fn a_checkpoint_signed_by_another_key_is_a_bad_signature() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path());
    let path = closed_log(dir.path(), &k, false, 6);
    let mut l = lines(&path);
    let i = l
        .iter()
        .position(|x| rec(x).checkpoint_kind() == Some(CheckpointKind::Count))
        .unwrap();
    let mut r = rec(&l[i]);
    let other = SigningKey::from_bytes(&[3u8; 32]);
    let cp = r.checkpoint.as_mut().unwrap();
    let message = record::checkpoint_message(&r.log_id, r.seq, &r.prev, cp.kind, &r.time);
    let old_sig = cp.sig.clone().unwrap();
    let new_sig = hex::encode(other.sign(&message).to_bytes());
    // Same length, same place: only the signature changes (the chain then breaks too).
    l[i] = l[i].replace(&old_sig, &new_sig);
    put(&path, &l);
    let report = check(&[&path], &k, false);
    assert!(report.has(ProblemClass::BadSignature, r.seq), "{report:#?}");
    assert!(report.problems.iter().all(|p| p.seq == Some(r.seq)), "{report:#?}");
    // Claiming the other key does not help.
    let old_pub = cp.pubkey.clone().unwrap();
    l[i] = l[i].replace(&old_pub, &hex::encode(other.verifying_key().to_bytes()));
    put(&path, &l);
    let report = check(&[&path], &k, false);
    assert!(report.has(ProblemClass::BadSignature, r.seq), "{report:#?}");
}

/// Rewrites the record at line `i` with `f`, re-MACs it with the key of `mac_epoch` and
/// re-chains every later line (re-MACing them with their own epoch's key or `mac_epoch`'s,
/// whichever is later), as someone holding the key of `mac_epoch` could.
fn reseal(l: &mut [String], i: usize, initial: &Zeroizing<[u8; 32]>, mac_epoch: u64, f: impl Fn(&mut AuditRecord)) {
    let mut ladder = KeyLadder::new(initial.clone());
    let mut prev: Option<String> = None;
    for line in l.iter_mut().skip(i) {
        let mut r = rec(line);
        if prev.is_none() {
            f(&mut r);
        }
        if let Some(p) = &prev {
            r.prev = p.clone();
        }
        let epoch = r.epoch.unwrap().max(mac_epoch);
        r.epoch = Some(epoch);
        r.mac = None;
        let mut bytes = serde_json::to_vec(&r).unwrap();
        let mac = hex::encode(keys::record_mac(ladder.key(epoch).unwrap(), &bytes));
        bytes.pop();
        bytes.extend_from_slice(format!(",\"mac\":\"{mac}\"}}").as_bytes());
        prev = Some(hex::encode(record::chain_hash(&bytes)));
        *line = String::from_utf8(bytes).unwrap();
    }
}

#[test]
fn a_mac_made_with_a_later_epochs_key_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path());
    let path = dir.path().join("audit.log");
    let mut opts = options(&k, true);
    opts.signing_key = None;
    opts.checkpoint_every = None;
    let mut log = AuditLog::open(&path, opts).unwrap();
    requests(&mut log, 0, 8);
    log.close().unwrap();
    let original = lines(&path);
    let last_epoch = rec(original.last().unwrap()).epoch.unwrap();
    assert!(last_epoch >= 4, "epochs: {last_epoch}");
    let unsigned = |paths: &[PathBuf]| {
        verify::verify(
            paths,
            &VerifyOptions {
                hmac_key: Some(k.initial.clone()),
                ..VerifyOptions::default()
            },
        )
        .unwrap()
    };
    assert!(unsigned(std::slice::from_ref(&path)).valid);

    // Record 4 (epoch 1) keeps its epoch but is sealed with epoch 2's key.
    let mut l = original.clone();
    let i = at(&l, 4);
    assert_eq!(rec(&l[i]).epoch, Some(1));
    let mut ladder = KeyLadder::new(k.initial.clone());
    let mut r = rec(&l[i]);
    r.action = "remove_cluster".into();
    r.mac = None;
    let mut bytes = serde_json::to_vec(&r).unwrap();
    let mac = hex::encode(keys::record_mac(ladder.key(2).unwrap(), &bytes));
    bytes.pop();
    bytes.extend_from_slice(format!(",\"mac\":\"{mac}\"}}").as_bytes());
    l[i] = String::from_utf8(bytes).unwrap();
    put(&path, &l);
    let report = unsigned(std::slice::from_ref(&path));
    assert!(report.has(ProblemClass::Modification, 4), "{report:#?}");

    // Someone holding the current key rewrites record 4 and everything after it, each line
    // validly MACed for the epoch it claims: only the epoch sequence gives it away.
    let mut l = original.clone();
    reseal(&mut l, i, &k.initial, last_epoch, |r| {
        r.action = "remove_cluster".into()
    });
    put(&path, &l);
    let report = unsigned(std::slice::from_ref(&path));
    assert_eq!(classes(&report), [(ProblemClass::Modification, Some(4))], "{report:#?}");
    assert!(report.problems[0].message.contains("later epoch"), "{report:#?}");
    assert_eq!(report.macs_verified, report.records);

    // The same rewrite sealed with each record's own epoch key verifies: MACs prove nothing
    // against whoever holds the earlier keys, which is why the writer erases them.
    let mut l = original.clone();
    reseal(&mut l, i, &k.initial, 0, |r| r.action = "remove_cluster".into());
    put(&path, &l);
    assert!(unsigned(std::slice::from_ref(&path)).valid);
}

#[test]
fn seq_continues_across_reopen_and_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path());
    let path = dir.path().join("audit.log");
    let mut log = AuditLog::open(&path, options(&k, true)).unwrap();
    requests(&mut log, 0, 3);
    let log_id = log.log_id().to_string();
    log.close().unwrap();

    // Clean reopen.
    let mut log = AuditLog::open(&path, options(&k, true)).unwrap();
    assert_eq!(log.log_id(), log_id);
    requests(&mut log, 3, 2);
    let rotated = log.rotate().unwrap();
    assert_eq!(rotated, dir.path().join("audit.log.1"));
    requests(&mut log, 5, 2);
    // Unclean: dropped without close.
    drop(log);

    let mut log = AuditLog::open(&path, options(&k, true)).unwrap();
    requests(&mut log, 7, 1);
    let second = log.rotate().unwrap();
    assert_eq!(second, dir.path().join("audit.log.2"));
    requests(&mut log, 8, 1);
    log.close().unwrap();

    let files = [path.clone(), rotated.clone(), second.clone()];
    let all: Vec<AuditRecord> = [&rotated, &second, &path]
        .iter()
        .flat_map(|p| lines(p))
        .map(|l| rec(&l))
        .collect();
    for (i, r) in all.iter().enumerate() {
        assert_eq!(r.seq, i as u64);
        assert_eq!(r.log_id, log_id);
    }
    for f in [&path, &rotated, &second] {
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(f).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o640, "{}", f.display());
    }
    let first_of_current = rec(&lines(&path)[0]);
    assert_eq!(first_of_current.action, record::ACTION_CONTINUED);
    let last_of_rotated = lines(&second).last().unwrap().clone();
    assert_eq!(
        first_of_current.prev,
        hex::encode(record::chain_hash(last_of_rotated.as_bytes()))
    );
    let opened: Vec<String> = all
        .iter()
        .filter(|r| r.action == record::ACTION_OPENED)
        .map(|r| r.outcome.clone().unwrap().code.unwrap())
        .collect();
    assert_eq!(opened, ["new", "clean", "unclean"]);

    // Given in any order, the files verify as one log; the unclean restart is a warning.
    let report = check(&files, &k, true);
    assert!(report.valid, "{report:#?}");
    assert_eq!(report.warnings.len(), 1, "{:#?}", report.warnings);
    assert!(report.warnings[0].message.contains("unclean"));
    // The current file alone: its head continues a file not given (a warning only).
    let report = check(&[&path], &k, true);
    assert!(report.valid, "{report:#?}");

    // Leaving out the middle file is a deletion (the first one cannot be told from a log whose
    // earlier files were not given, which is a warning).
    let report = check(&[&path, &rotated], &k, true);
    assert!(
        report.problems.iter().any(|p| p.class == ProblemClass::Deletion),
        "{report:#?}"
    );
    assert!(check(&[&path, &second], &k, true).valid);

    // Cutting the end of a rotated file (its rotation checkpoint and more) is a truncation.
    let mut l = lines(&rotated);
    let cut = rec(&l[l.len() - 3]).seq;
    l.truncate(l.len() - 3);
    put(&rotated, &l);
    let report = check(&files, &k, true);
    assert_eq!(classes(&report), [(ProblemClass::Truncation, Some(cut))], "{report:#?}");
}

#[test]
fn secrets_never_reach_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path());
    let path = dir.path().join("audit.log");
    let mut log = AuditLog::open(&path, options(&k, true)).unwrap();
    let secret = "MC4CAQAwBQYDK2VwBCIEIHNlY3JldC1rZXktYnl0ZXMtMTIzNDU2Nzg5MGFi";
    let pem = format!("-----BEGIN PRIVATE KEY-----\n{secret}\n-----END PRIVATE KEY-----\n");
    let cert = proto::Certificate {
        address: "127.0.0.1:8443".into(),
        certificate: "-----BEGIN CERTIFICATE-----\nMIIBAQID\n-----END CERTIFICATE-----\n".into(),
        key: pem.clone(),
        ..Default::default()
    };
    let add = proto::Request {
        id: "cert".into(),
        kind: Some(Kind::AddCertificate(cert.clone())),
    };
    let batch = proto::Request {
        id: "batch".into(),
        kind: Some(Kind::Apply(proto::Batch {
            requests: vec![add.clone()],
            base_state_hash: String::new(),
        })),
    };
    let r = log.append(AuditEvent::received(actor(), &add, None)).unwrap();
    log.append(AuditEvent::completed(
        actor(),
        &add,
        r.seq,
        Outcome::ok("added"),
        None,
        None,
    ))
    .unwrap();
    log.append(AuditEvent::denied(
        actor(),
        &batch,
        "forbidden",
        "role viewer may not apply",
    ))
    .unwrap();
    log.close().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains(secret));
    assert!(!text.contains("sign.key") && !text.contains(&hex::encode(k.initial.as_ref())));
    let fingerprint = record::secret_fingerprint(&pem);
    assert_eq!(text.matches(&fingerprint).count(), 2);
    assert!(check(&[path], &k, true).valid);
}

#[test]
fn a_failed_write_fails_closed() {
    // /dev/full accepts the open and refuses every write with ENOSPC.
    if !Path::new("/dev/full").exists() {
        eprintln!("skipped: /dev/full is missing");
        return;
    }
    let opts = AuditOptions {
        checkpoint_every: None,
        ..AuditOptions::default()
    };
    match AuditLog::open(Path::new("/dev/full"), opts) {
        Err(AuditError::Write { .. }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn time_checkpoints_come_from_the_caller() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path());
    let path = dir.path().join("audit.log");
    let mut opts = options(&k, false);
    opts.checkpoint_every = None;
    opts.checkpoint_interval = Some(Duration::from_secs(60));
    let mut log = AuditLog::open(&path, opts).unwrap();
    let now = Instant::now();
    assert!(log.checkpoint_if_due(now).unwrap().is_none());
    let later = now + Duration::from_secs(61);
    let cp = log.checkpoint_if_due(later).unwrap().unwrap();
    // Nothing written since: no new checkpoint.
    assert!(
        log.checkpoint_if_due(later + Duration::from_secs(120))
            .unwrap()
            .is_none()
    );
    log.close().unwrap();
    let l = lines(&path);
    assert_eq!(rec(&l[at(&l, cp.seq)]).checkpoint_kind(), Some(CheckpointKind::Time));
}

#[test]
fn export_keeps_only_what_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path());
    let path = closed_log(dir.path(), &k, false, 6);
    let mut l = lines(&path);
    let i = at(&l, 3);
    l[i] = tamper(&l[i]);
    put(&path, &l);
    let report = check(&[&path], &k, false);
    let out = dir.path().join("export.jsonl");
    let exported = verify::export(&report, &out, true).unwrap();
    let kept = lines(&out);
    assert_eq!(exported.written as usize, kept.len());
    assert!(kept.iter().all(|x| rec(x).seq != 3));
    // Records before the modified one are not vouched for by a later checkpoint any more,
    // unless an earlier checkpoint covers them.
    assert!(kept.iter().any(|x| rec(x).seq > 3));
    assert_eq!(exported.written + exported.left_out, l.len() as u64);
    assert!(
        verify::export(&report, &out, true).is_err(),
        "an existing file is never overwritten"
    );

    // Without --pubkey every record that is not part of a problem is exported.
    let out2 = dir.path().join("export2.jsonl");
    let exported = verify::export(&report, &out2, false).unwrap();
    assert_eq!(exported.left_out, 1);
}

fn verify_cmd(files: Vec<PathBuf>, hmac_key: Option<String>, pubkey: Option<String>) -> ExitCode {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = cli::run_with(
        AuditCommand::Verify(VerifyArgs {
            files,
            keys: KeyArgs {
                hmac_key,
                pubkey,
                live: false,
            },
            json: true,
        }),
        &mut out,
        &mut err,
    );
    if code == ExitCode::SUCCESS || code == ExitCode::from(1) {
        let report: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(report["valid"], code == ExitCode::SUCCESS);
    } else {
        assert!(!err.is_empty());
    }
    code
}

#[test]
fn verify_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path());
    let path = closed_log(dir.path(), &k, true, 2);
    let hmac = Some(hex::encode(k.initial.as_ref()));
    let pubkey = Some(format!("{}.pub", k.seed.display()));
    assert_eq!(
        verify_cmd(vec![path.clone()], hmac.clone(), pubkey.clone()),
        ExitCode::SUCCESS
    );
    assert_eq!(
        verify_cmd(vec![path.clone()], Some("ab".repeat(32)), pubkey.clone()),
        ExitCode::from(1)
    );
    assert_eq!(
        verify_cmd(vec![path.clone()], Some("not-a-key".into()), None),
        ExitCode::from(2)
    );
    assert_eq!(
        verify_cmd(vec![dir.path().join("missing.log")], None, None),
        ExitCode::from(2)
    );
    let mut l = lines(&path);
    l.remove(2);
    put(&path, &l);
    assert_eq!(verify_cmd(vec![path], hmac, pubkey), ExitCode::from(1));
}

#[test]
fn malformed_lines_are_reported_where_they_sit() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path());
    let path = closed_log(dir.path(), &k, false, 4);
    let mut l = lines(&path);
    let i = at(&l, 4);
    l[i] = l[i].replacen('{', "[", 1);
    put(&path, &l);
    let report = check(&[&path], &k, false);
    assert_eq!(classes(&report), [(ProblemClass::Malformed, Some(4))], "{report:#?}");
}

#[test]
fn system_events_and_the_syslog_mirror() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path());
    let sock = dir.path().join("log.sock");
    let daemon = std::os::unix::net::UnixDatagram::bind(&sock).unwrap();
    daemon.set_nonblocking(true).unwrap();
    let path = dir.path().join("audit.log");
    let mut opts = options(&k, false);
    opts.syslog = Some(crate::syslog::SyslogOptions {
        socket: sock.clone(),
        hostname: Some("h".into()),
        ..Default::default()
    });
    let mut log = AuditLog::open(&path, opts).unwrap();
    let appended = log
        .append(AuditEvent::system(
            "worker_crash",
            Outcome::error("sigsys", "worker 1 killed by SIGSYS"),
        ))
        .unwrap();
    assert_eq!(appended.syslog, Some(crate::syslog::MirrorStatus::Sent));
    log.close().unwrap();
    let mut buf = [0u8; 4096];
    let mut got = Vec::new();
    while let Ok(n) = daemon.recv(&mut buf) {
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert_eq!(got.len(), 3, "{got:#?}");
    assert!(got[1].contains(&format!("hash=\"{}\"", appended.hash)), "{}", got[1]);
    assert!(got[1].starts_with("<84>1 "), "{}", got[1]);
    assert!(
        got[2].contains("checkpoint=\"close\"") && got[2].contains("sig=\""),
        "{}",
        got[2]
    );
    let r = rec(&lines(&path)[1]);
    assert_eq!(r.stage, Stage::System);
}

#[test]
fn show_filters_records() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path());
    let path = dir.path().join("audit.log");
    let mut log = AuditLog::open(&path, options(&k, false)).unwrap();
    requests(&mut log, 0, 2);
    let mut bob = actor();
    bob.uid = 1001;
    bob.user = Some("bob".into());
    log.append(AuditEvent::denied(
        bob,
        &add_cluster(9),
        "forbidden",
        "role viewer may not add_cluster",
    ))
    .unwrap();
    log.close().unwrap();
    let show = |f: &dyn Fn(&mut cli::ShowArgs)| {
        let mut args = cli::ShowArgs {
            files: vec![path.clone()],
            since: None,
            until: None,
            actor: None,
            action: None,
            target: None,
            outcome: None,
            request_id: None,
            json: true,
        };
        f(&mut args);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        assert_eq!(
            cli::run_with(AuditCommand::Show(args), &mut out, &mut err),
            ExitCode::SUCCESS
        );
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| rec(l).seq)
            .collect::<Vec<_>>()
    };
    let denied = show(&|a| a.outcome = Some(cli::OutcomeFilter::Denied));
    assert_eq!(denied.len(), 1);
    assert_eq!(show(&|a| a.actor = Some("bob".into())), denied);
    assert_eq!(show(&|a| a.actor = Some("1001".into())), denied);
    assert_eq!(show(&|a| a.request_id = Some("req-1".into())).len(), 2);
    assert_eq!(show(&|a| a.target = Some("cluster c0".into())).len(), 2);
    // A count checkpoint after five records, and the close checkpoint.
    assert_eq!(show(&|a| a.action = Some("checkpoint".into())).len(), 2);
    assert_eq!(show(&|a| a.since = Some("1h".into())).len(), lines(&path).len());
    assert!(show(&|a| a.until = Some("2000-01-01T00:00:00Z".into())).is_empty());
    // The table has a header and one row per record.
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let args = cli::ShowArgs {
        files: vec![path.clone()],
        since: None,
        until: None,
        actor: Some("bob".into()),
        action: None,
        target: None,
        outcome: None,
        request_id: None,
        json: false,
    };
    cli::run_with(AuditCommand::Show(args), &mut out, &mut err);
    let table = String::from_utf8(out).unwrap();
    assert_eq!(table.lines().count(), 2, "{table}");
    assert!(
        table.contains("bob(1001)") && table.contains("role viewer may not add_cluster"),
        "{table}"
    );
}

#[test]
fn copies_changed_seqs_and_unsigned_checkpoints_are_caught() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path());
    let path = closed_log(dir.path(), &k, false, 4);
    let original = lines(&path);

    // A copy of a record inserted later.
    let mut l = original.clone();
    let copy = l[at(&l, 2)].clone();
    l.insert(at(&l, 6), copy);
    put(&path, &l);
    assert_eq!(
        classes(&check(&[&path], &k, false)),
        [(ProblemClass::Modification, Some(2))]
    );

    // A record whose seq field was changed (same length).
    let mut l = original.clone();
    let i = at(&l, 4);
    l[i] = l[i].replacen("\"seq\":4,", "\"seq\":9,", 1);
    put(&path, &l);
    let report = check(&[&path], &k, false);
    assert!(report.has(ProblemClass::Modification, 4), "{report:#?}");
    assert!(
        report.problems.iter().all(|p| p.class == ProblemClass::Modification),
        "{report:#?}"
    );

    // A forged close checkpoint appended after a cut: unsigned, so a bad signature.
    let mut l = original.clone();
    l.truncate(l.len() - 3);
    let last = l.last().unwrap().clone();
    let mut forged = rec(&original[original.len() - 1]);
    forged.seq = rec(&last).seq + 1;
    forged.prev = hex::encode(record::chain_hash(last.as_bytes()));
    forged.checkpoint.as_mut().unwrap().sig = None;
    l.push(serde_json::to_string(&forged).unwrap());
    put(&path, &l);
    let report = check(&[&path], &k, false);
    assert_eq!(
        classes(&report),
        [(ProblemClass::BadSignature, Some(forged.seq))],
        "{report:#?}"
    );
    // Without the public key nothing can tell: the summary says signatures were not checked.
    let unchecked = verify::verify(std::slice::from_ref(&path), &VerifyOptions::default()).unwrap();
    assert!(unchecked.valid);
    assert!(
        unchecked.summary.contains("signatures not checked"),
        "{}",
        unchecked.summary
    );
}

// ---------------------------------------------------------------------------------------------
// Failed writes and torn tails

/// Set in a child process that runs one test alone (see [`in_child`]).
const CHILD_ENV: &str = "RAMPART_AUDIT_TEST_CHILD";

/// Runs `scenario` in a child process (this test binary again, running only `test`): it sets
/// process-wide limits (RLIMIT_FSIZE) that would break the tests running in parallel threads
/// of this one. In the parent, checks that the child passed.
fn in_child(test: &str, scenario: impl FnOnce()) {
    if std::env::var_os(CHILD_ENV).is_some() {
        scenario();
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            &format!("log_tests::{test}"),
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the child running {test} failed:\n{text}");
    assert!(text.contains("1 passed"), "the child did not run {test}:\n{text}");
}

/// Limits the size of every file this process writes to `bytes` (soft limit; the hard limit
/// stays, so [`unlimit_file_size`] can raise it again). SIGXFSZ is ignored, so a write past
/// the limit fails with EFBIG instead of killing the process, and a write across it is short.
fn limit_file_size(bytes: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: SIG_IGN installs no handler code; the test process runs nothing that relies on
    // SIGXFSZ.
    unsafe { signal(Signal::SIGXFSZ, SigHandler::SigIgn) }.unwrap();
    let (_, hard) = getrlimit(Resource::RLIMIT_FSIZE).unwrap();
    setrlimit(Resource::RLIMIT_FSIZE, bytes, hard).unwrap();
}

fn unlimit_file_size() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_FSIZE).unwrap();
    setrlimit(Resource::RLIMIT_FSIZE, hard, hard).unwrap();
}

#[test]
fn a_failed_write_leaves_no_partial_line_and_the_log_recovers() {
    in_child("a_failed_write_leaves_no_partial_line_and_the_log_recovers", || {
        let dir = tempfile::tempdir().unwrap();
        let k = keys(dir.path());
        let path = dir.path().join("audit.log");
        let mut log = AuditLog::open(&path, options(&k, true)).unwrap();
        requests(&mut log, 0, 2);
        let before = std::fs::read(&path).unwrap();
        let seq = log.next_seq();

        // Room for 60 more bytes: the next record (a count checkpoint is due first) is written
        // in part, then the write fails.
        limit_file_size(before.len() as u64 + 60);
        let r = add_cluster(100);
        match log.append(AuditEvent::received(actor(), &r, None)) {
            Err(AuditError::Write { source, .. }) => assert_eq!(source.raw_os_error(), Some(libc::EFBIG)),
            other => panic!("{other:?}"),
        }
        // The part that reached the file was cut: it ends with its last whole record.
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert_eq!(log.next_seq(), seq, "a failed record takes no seq");
        for _ in 0..3 {
            assert!(log.append(AuditEvent::denied(actor(), &r, "forbidden", "no")).is_err());
        }
        // A rotation fails too, and leaves the file as it was.
        assert!(log.rotate().is_err());
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert!(!dir.path().join("audit.log.1").exists());
        assert!(!dir.path().join("audit.log.rotating").exists());
        // The timer waits a second before it tries again, then its attempt to record the
        // failure fails and is no lost record.
        assert!(log.checkpoint_if_due(Instant::now()).unwrap().is_none());
        assert!(log.checkpoint_if_due(Instant::now() + Duration::from_secs(2)).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert_eq!(log.failed_writes(), 5);

        // Space again: the next write works, after the record of what was lost.
        unlimit_file_size();
        let received = log.append(AuditEvent::received(actor(), &r, None)).unwrap();
        assert!(received.seq > seq);
        assert_eq!(log.failed_writes(), 0);
        log.close().unwrap();
        let l = lines(&path);
        let failed = rec(&l[at(&l, seq)]);
        assert_eq!(failed.action, record::ACTION_WRITE_FAILED);
        assert_eq!(failed.stage, Stage::System);
        let outcome = failed.outcome.unwrap();
        assert_eq!(outcome.code.as_deref(), Some("write_failed"));
        let message = outcome.message.unwrap();
        for part in [
            "5 record(s) could not be written",
            "received add_cluster x1",
            "denied add_cluster x3",
            "checkpoint (count) x1",
            "File too large",
        ] {
            assert!(message.contains(part), "{part}: {message}");
        }
        let report = check(&[&path], &k, true);
        assert!(report.valid, "{report:#?}");
    });
}

#[test]
fn a_torn_tail_is_moved_aside_and_its_cut_recorded() {
    use sha2::Digest;
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path());
    let path = closed_log(dir.path(), &k, true, 3);
    let clean = std::fs::read(&path).unwrap();
    let last_seq = rec(lines(&path).last().unwrap()).seq;

    // Half a record, no newline: what a crash during a write leaves.
    let torn = b"{\"v\":1,\"log_id\":\"0123";
    std::fs::write(&path, [clean.as_slice(), torn].concat()).unwrap();
    let report = check(&[&path], &k, true);
    assert_eq!(
        classes(&report),
        [(ProblemClass::TornTail, Some(last_seq + 1))],
        "{report:#?}"
    );
    let message = &report.problems[0].message;
    assert!(
        message.contains(&format!("last {} byte(s), from offset {}", torn.len(), clean.len())),
        "{message}"
    );

    let mut log = AuditLog::open(&path, options(&k, true)).unwrap();
    let cut = log.repaired().unwrap().clone();
    assert_eq!(cut.offset, clean.len() as u64);
    assert_eq!(cut.length, torn.len() as u64);
    assert_eq!(cut.sha256, hex::encode(sha2::Sha256::digest(torn)));
    assert!(cut.file.starts_with("audit.log.torn-"), "{}", cut.file);
    let side = dir.path().join(&cut.file);
    assert_eq!(std::fs::read(&side).unwrap(), torn);
    requests(&mut log, 10, 1);
    log.close().unwrap();

    // The whole records are untouched, and the first new one is the repair.
    let bytes = std::fs::read(&path).unwrap();
    assert!(bytes.starts_with(&clean));
    let l = lines(&path);
    let repair = rec(&l[at(&l, last_seq + 1)]);
    assert_eq!(repair.action, record::ACTION_REPAIRED);
    assert_eq!(repair.torn_tail.as_ref(), Some(&cut));
    assert_eq!(rec(&l[at(&l, last_seq + 2)]).action, record::ACTION_OPENED);

    let report = check(&[&path], &k, true);
    assert!(report.valid, "{report:#?}");
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.seq == Some(last_seq + 1) && w.message.contains("holds exactly them")),
        "{:#?}",
        report.warnings
    );
    // `audit.log*` names the side file too: it is checked, not read as a log.
    let report = check(&[&path, &side], &k, true);
    assert!(report.valid, "{report:#?}");
    assert_eq!(report.files.len(), 1);

    // A side file that does not hold what was cut is found.
    std::fs::write(&side, b"something else").unwrap();
    let report = check(&[&path], &k, true);
    assert_eq!(
        classes(&report),
        [(ProblemClass::Modification, Some(last_seq + 1))],
        "{report:#?}"
    );
    std::fs::write(&side, torn).unwrap();

    // A repair record that no longer sits where the cut was: a whole record removed before it
    // shows as that, plus the offset the repair record proves.
    let mut moved = l.clone();
    let first = moved.remove(0);
    put(&path, &moved);
    let report = check(&[&path], &k, true);
    assert!(report.has(ProblemClass::Modification, last_seq + 1), "{report:#?}");
    moved.insert(0, first);
    put(&path, &moved);
    assert!(check(&[&path], &k, true).valid);
}

#[test]
fn a_last_line_that_is_not_a_record_is_a_torn_tail_too() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path());
    let path = closed_log(dir.path(), &k, false, 2);
    let clean = std::fs::read(&path).unwrap();
    let last_seq = rec(lines(&path).last().unwrap()).seq;
    // Zeros where a record should be, newline and all: a crash that lost a write's data.
    let garbage = b"\0\0\0\0\0\0\0\0\n";
    std::fs::write(&path, [clean.as_slice(), garbage].concat()).unwrap();
    let report = check(&[&path], &k, false);
    assert_eq!(
        classes(&report),
        [(ProblemClass::TornTail, Some(last_seq + 1))],
        "{report:#?}"
    );
    // The same line in the middle of the file is a malformed record.
    std::fs::write(&path, [garbage.as_slice(), clean.as_slice()].concat()).unwrap();
    let report = check(&[&path], &k, false);
    assert!(
        report.problems.iter().all(|p| p.class == ProblemClass::Malformed),
        "{report:#?}"
    );

    std::fs::write(&path, [clean.as_slice(), garbage].concat()).unwrap();
    let log = AuditLog::open(&path, options(&k, false)).unwrap();
    assert_eq!(log.repaired().map(|t| t.length), Some(garbage.len() as u64));
    log.close().unwrap();
    let report = check(&[&path], &k, false);
    assert!(report.valid, "{report:#?}");

    // Two lines that are not records: more than a torn write, the writer refuses.
    std::fs::write(&path, [clean.as_slice(), b"x\n", b"y\n"].concat()).unwrap();
    match AuditLog::open(&path, options(&k, false)) {
        Err(AuditError::CorruptTail { .. }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_log_that_is_only_a_torn_write_starts_anew() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path());
    let path = dir.path().join("audit.log");
    std::fs::write(&path, b"{\"v\":1,\"lo").unwrap();
    let log = AuditLog::open(&path, options(&k, true)).unwrap();
    assert_eq!(log.repaired().map(|t| (t.offset, t.length)), Some((0, 10)));
    log.close().unwrap();
    let l = lines(&path);
    assert_eq!(rec(&l[0]).action, record::ACTION_REPAIRED);
    assert_eq!(rec(&l[0]).seq, 0);
    assert!(check(&[&path], &k, true).valid);
}

#[test]
fn a_repair_that_cannot_be_recorded_puts_the_torn_bytes_back() {
    in_child("a_repair_that_cannot_be_recorded_puts_the_torn_bytes_back", || {
        let dir = tempfile::tempdir().unwrap();
        let k = keys(dir.path());
        let path = closed_log(dir.path(), &k, false, 1);
        let mut torn = std::fs::read(&path).unwrap();
        let clean_len = torn.len() as u64;
        torn.extend_from_slice(b"{\"v\":1");
        std::fs::write(&path, &torn).unwrap();
        // Room for the torn bytes and its side file, not for the repair record.
        limit_file_size(clean_len + 10);
        match AuditLog::open(&path, options(&k, false)) {
            Err(e @ AuditError::TornTailRecord { .. }) => {
                assert!(e.to_string().contains("put back"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(std::fs::read(&path).unwrap(), torn);
        let sides = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().contains(".torn-"))
            .count();
        assert_eq!(sides, 0, "the side file of an undone cut is removed");
        unlimit_file_size();
        let log = AuditLog::open(&path, options(&k, false)).unwrap();
        assert!(log.repaired().is_some());
    });
}

#[test]
fn a_second_writer_on_the_same_file_is_refused_before_it_writes() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path());
    let path = dir.path().join("audit.log");
    let mut first = AuditLog::open(&path, options(&k, false)).unwrap();
    let before = std::fs::read(&path).unwrap();
    match AuditLog::open(&path, options(&k, false)) {
        Err(e @ AuditError::InUse { .. }) => {
            assert!(e.to_string().contains(&format!("pid {}", std::process::id())), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::read(&path).unwrap(), before);
    // The file made by a rotation is locked too.
    first.rotate().unwrap();
    assert!(matches!(
        AuditLog::open(&path, options(&k, false)),
        Err(AuditError::InUse { .. })
    ));
    requests(&mut first, 0, 1);
    drop(first);
    let log = AuditLog::open(&path, options(&k, false)).unwrap();
    log.close().unwrap();
}
