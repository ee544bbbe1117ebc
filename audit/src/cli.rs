//! The reviewer's commands, mounted by the `rampart` binary as `rampart audit ...`.
//!
//! Exit codes: 0 when everything checked is valid, 1 when something is invalid (verify,
//! export), 2 on usage errors (a bad key or time argument) and I/O errors.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand, ValueEnum};

use crate::keys;
use crate::record::{AuditRecord, OutcomeStatus};
use crate::verify::{self, Report, VerifyOptions};

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain, MACs and checkpoint signatures; report every problem.
    Verify(VerifyArgs),
    /// Print records, filtered, as a table or JSON lines (without verifying them).
    Show(ShowArgs),
    /// Write only the records that verify to a new file.
    Export(ExportArgs),
    /// Create a checkpoint signing key (Ed25519), or with --hmac an HMAC key state.
    Keygen(KeygenArgs),
}

#[derive(Debug, Args)]
pub struct KeyArgs {
    /// Initial (epoch 0) HMAC key: 64 hex digits or a file holding them.
    #[arg(long, value_name = "K")]
    pub hmac_key: Option<String>,
    /// Checkpoint public key: 64 hex digits or a file holding them (keygen's `.pub`).
    #[arg(long, value_name = "P")]
    pub pubkey: Option<String>,
    /// The log is still being written: an open tail is a warning, not a truncation.
    #[arg(long)]
    pub live: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Audit files: the current log and its rotated files, in any order.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    #[command(flatten)]
    pub keys: KeyArgs,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutcomeFilter {
    Ok,
    Error,
    Denied,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Records at or after T: RFC 3339 (`2025-01-31T12:00:00Z`) or an age (`2h`, `3days`).
    #[arg(long, value_name = "T")]
    pub since: Option<String>,
    /// Records before T, same forms as --since.
    #[arg(long, value_name = "T")]
    pub until: Option<String>,
    /// A uid, or a user name.
    #[arg(long, value_name = "UID|NAME")]
    pub actor: Option<String>,
    /// Request kind, such as add_cluster.
    #[arg(long, value_name = "A")]
    pub action: Option<String>,
    /// Records whose target contains this text.
    #[arg(long, value_name = "T")]
    pub target: Option<String>,
    #[arg(long, value_enum)]
    pub outcome: Option<OutcomeFilter>,
    #[arg(long, value_name = "ID")]
    pub request_id: Option<String>,
    /// JSON lines (the records as written) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// The new file to write (it must not exist).
    #[arg(long, value_name = "OUT")]
    pub out: PathBuf,
    #[command(flatten)]
    pub keys: KeyArgs,
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Where to write the key (it must not exist); the public key goes to `<FILE>.pub`.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Create an HMAC key state (epoch 0) instead of an Ed25519 signing key.
    #[arg(long)]
    pub hmac: bool,
}

/// Runs one `rampart audit` command, printing to stdout and stderr.
pub fn run(cmd: AuditCommand) -> ExitCode {
    run_with(cmd, &mut std::io::stdout().lock(), &mut std::io::stderr().lock())
}

/// [`run`], printing to the given writers.
pub fn run_with(cmd: AuditCommand, out: &mut dyn Write, err: &mut dyn Write) -> ExitCode {
    let result = match cmd {
        AuditCommand::Verify(args) => run_verify(&args, out),
        AuditCommand::Show(args) => run_show(&args, out, err),
        AuditCommand::Export(args) => run_export(&args, err),
        AuditCommand::Keygen(args) => run_keygen(&args, out),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            let _ = writeln!(err, "rampart audit: {message}");
            ExitCode::from(2)
        }
    }
}

fn verify_options(args: &KeyArgs) -> Result<VerifyOptions, String> {
    Ok(VerifyOptions {
        hmac_key: args
            .hmac_key
            .as_deref()
            .map(keys::parse_hmac_key)
            .transpose()
            .map_err(|e| format!("--hmac-key: {e}"))?,
        pubkey: args
            .pubkey
            .as_deref()
            .map(keys::parse_public_key)
            .transpose()
            .map_err(|e| format!("--pubkey: {e}"))?,
        live: args.live,
    })
}

fn print_findings(report: &Report, out: &mut dyn Write) -> std::io::Result<()> {
    for p in &report.problems {
        let seq = p.seq.map_or("?".to_string(), |s| s.to_string());
        writeln!(
            out,
            "{} at seq {seq}: {}:{}: {}",
            p.class.name(),
            p.file,
            p.line,
            p.message
        )?;
    }
    for w in &report.warnings {
        let seq = w.seq.map_or("?".to_string(), |s| s.to_string());
        writeln!(out, "warning at seq {seq}: {}:{}: {}", w.file, w.line, w.message)?;
    }
    Ok(())
}

fn run_verify(args: &VerifyArgs, out: &mut dyn Write) -> Result<ExitCode, String> {
    let options = verify_options(&args.keys)?;
    let report = verify::verify(&args.files, &options).map_err(|e| e.to_string())?;
    let written = if args.json {
        serde_json::to_string_pretty(&report)
            .map_err(std::io::Error::other)
            .and_then(|text| writeln!(out, "{text}"))
    } else {
        print_findings(&report, out).and_then(|()| writeln!(out, "{}", report.summary))
    };
    written.map_err(|e| format!("cannot write the report: {e}"))?;
    Ok(if report.valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn run_export(args: &ExportArgs, err: &mut dyn Write) -> Result<ExitCode, String> {
    let options = verify_options(&args.keys)?;
    let report = verify::verify(&args.files, &options).map_err(|e| e.to_string())?;
    let exported = verify::export(&report, &args.out, options.pubkey.is_some()).map_err(|e| e.to_string())?;
    let _ = print_findings(&report, err);
    let _ = writeln!(err, "{}", report.summary);
    let _ = writeln!(
        err,
        "exported {} record(s) to {}; left out {}{}",
        exported.written,
        args.out.display(),
        exported.left_out,
        if options.pubkey.is_some() {
            " (records not covered by a verified checkpoint are left out too)"
        } else {
            ""
        }
    );
    Ok(if report.valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn run_keygen(args: &KeygenArgs, out: &mut dyn Write) -> Result<ExitCode, String> {
    let text = if args.hmac {
        let key = keys::generate_hmac_key(&args.out).map_err(|e| e.to_string())?;
        format!(
            "wrote the HMAC key state (epoch 0) to {file} (mode 0600)\n\
             initial HMAC key: {key}\n\
             keep this key off this host: `rampart audit verify --hmac-key` needs it; rampart moves {file} to the \
             next epoch as it writes and erases the old keys",
            file = args.out.display(),
            key = hex::encode(key.as_ref())
        )
    } else {
        let public = keys::generate_signing_key(&args.out).map_err(|e| e.to_string())?;
        format!(
            "wrote the signing key to {file} (mode 0600) and the public key to {file}.pub\npublic key: {key}",
            file = args.out.display(),
            key = hex::encode(public.to_bytes())
        )
    };
    writeln!(out, "{text}").map_err(|e| format!("cannot write: {e}"))?;
    Ok(ExitCode::SUCCESS)
}

/// `--since`/`--until`: an RFC 3339 time, or an age before now.
fn parse_time(arg: &str) -> Result<SystemTime, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(arg) {
        return Ok(t);
    }
    let age: Duration = humantime::parse_duration(arg)
        .map_err(|_| format!("`{arg}` is neither an RFC 3339 time (2025-01-31T12:00:00Z) nor an age (2h, 3days)"))?;
    SystemTime::now()
        .checked_sub(age)
        .ok_or_else(|| format!("`{arg}` reaches back before the epoch"))
}

struct Filter {
    since: Option<SystemTime>,
    until: Option<SystemTime>,
}

fn matches(rec: &AuditRecord, args: &ShowArgs, filter: &Filter) -> bool {
    if filter.since.is_some() || filter.until.is_some() {
        let Some(t) = rec.timestamp() else { return false };
        if filter.since.is_some_and(|s| t < s) || filter.until.is_some_and(|u| t >= u) {
            return false;
        }
    }
    if let Some(actor) = &args.actor {
        let Some(a) = &rec.actor else { return false };
        let hit = match actor.parse::<u32>() {
            Ok(uid) => a.uid == uid,
            Err(_) => a.user.as_deref() == Some(actor.as_str()),
        };
        if !hit {
            return false;
        }
    }
    if args.action.as_ref().is_some_and(|a| *a != rec.action) {
        return false;
    }
    if let Some(t) = &args.target
        && !rec.target.as_deref().is_some_and(|rt| rt.contains(t.as_str()))
    {
        return false;
    }
    if let Some(o) = args.outcome {
        let want = match o {
            OutcomeFilter::Ok => OutcomeStatus::Ok,
            OutcomeFilter::Error => OutcomeStatus::Error,
            OutcomeFilter::Denied => OutcomeStatus::Denied,
        };
        if rec.outcome.as_ref().map(|x| x.status) != Some(want) {
            return false;
        }
    }
    if args
        .request_id
        .as_ref()
        .is_some_and(|id| rec.request_id.as_ref() != Some(id))
    {
        return false;
    }
    true
}

fn cell(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        format!("{text:<width$}")
    } else {
        let cut: String = text.chars().take(width.saturating_sub(1)).collect();
        format!("{cut}~")
    }
}

fn table_row(rec: &AuditRecord) -> String {
    let actor = match &rec.actor {
        Some(a) => match &a.user {
            Some(u) => format!("{u}({})", a.uid),
            None => a.uid.to_string(),
        },
        None => "-".into(),
    };
    let role = rec
        .actor
        .as_ref()
        .and_then(|a| a.role.clone())
        .unwrap_or_else(|| "-".into());
    let outcome = match (&rec.outcome, rec.checkpoint_kind()) {
        (_, Some(kind)) => kind.name().to_string(),
        (Some(o), None) => o.status.name().to_string(),
        (None, None) => "-".into(),
    };
    let mut target = rec.target.clone().unwrap_or_default();
    if let Some(o) = rec.outcome.as_ref().filter(|o| o.status != OutcomeStatus::Ok)
        && let Some(m) = &o.message
    {
        target = format!("{target} ({m})");
    }
    // Processes that did not simply apply a change are named: who refused, who was late, who
    // was replaced.
    let unusual: Vec<String> = rec
        .processes
        .iter()
        .flatten()
        .filter(|p| p.result != crate::record::ProcessResult::Applied || p.replaced)
        .map(|p| {
            let replaced = if p.replaced { ", replaced" } else { "" };
            format!("{} pid {} {}{replaced}", p.process, p.pid, p.result.name())
        })
        .collect();
    if !unusual.is_empty() {
        target = format!("{target} [{}]", unusual.join("; "));
    }
    format!(
        "{} {} {} {} {} {} {} {}",
        cell(&rec.seq.to_string(), 8),
        cell(&rec.time, 24),
        cell(rec.stage.name(), 10),
        cell(&actor, 18),
        cell(&role, 8),
        cell(&rec.action, 22),
        cell(&outcome, 8),
        target
    )
}

/// The first record of a file: log id and seq, to put files in chain order.
fn first_key(path: &Path) -> Result<(Option<String>, u64), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    for line in BufReader::new(file).lines() {
        let line = line.map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if let Ok(rec) = serde_json::from_str::<AuditRecord>(&line) {
            return Ok((Some(rec.log_id), rec.seq));
        }
    }
    Ok((None, u64::MAX))
}

fn run_show(args: &ShowArgs, out: &mut dyn Write, err: &mut dyn Write) -> Result<ExitCode, String> {
    let filter = Filter {
        since: args.since.as_deref().map(parse_time).transpose()?,
        until: args.until.as_deref().map(parse_time).transpose()?,
    };
    let mut keyed = Vec::new();
    let mut logs: Vec<String> = Vec::new();
    for path in &args.files {
        let (log, seq) = first_key(path)?;
        let group = match log {
            Some(id) => logs.iter().position(|l| *l == id).unwrap_or_else(|| {
                logs.push(id);
                logs.len() - 1
            }),
            None => usize::MAX,
        };
        keyed.push(((group, seq), path));
    }
    keyed.sort_by_key(|(key, _)| *key);
    let write_err = |e: std::io::Error| format!("cannot write: {e}");
    if !args.json {
        writeln!(
            out,
            "{} {} {} {} {} {} {} TARGET",
            cell("SEQ", 8),
            cell("TIME", 24),
            cell("STAGE", 10),
            cell("ACTOR", 18),
            cell("ROLE", 8),
            cell("ACTION", 22),
            cell("OUTCOME", 8)
        )
        .map_err(write_err)?;
    }
    let mut skipped = 0u64;
    for (_, path) in keyed {
        let file = std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        for line in BufReader::new(file).lines() {
            let line = line.map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let Ok(rec) = serde_json::from_str::<AuditRecord>(&line) else {
                skipped += 1;
                continue;
            };
            if !matches(&rec, args, &filter) {
                continue;
            }
            if args.json {
                writeln!(out, "{line}").map_err(write_err)?;
            } else {
                writeln!(out, "{}", table_row(&rec)).map_err(write_err)?;
            }
        }
    }
    if skipped > 0 {
        let _ = writeln!(
            err,
            "rampart audit show: skipped {skipped} line(s) that are not audit records; run `rampart audit verify`"
        );
    }
    Ok(ExitCode::SUCCESS)
}
