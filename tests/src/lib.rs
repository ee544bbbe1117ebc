//! Helpers for the end-to-end tests in `tests/tests/`: the built `rampart` binary, temporary
//! directories, free ports, and prerequisites that are skipped with a reason (or, under
//! `CI=true`, fail) when missing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The `rampart` binary the tests run: `$RAMPART_BIN`, or the debug build in `target/`.
/// `scripts/test` builds it before running the tests.
pub fn rampart_bin() -> PathBuf {
    if let Ok(path) = std::env::var("RAMPART_BIN") {
        return PathBuf::from(path);
    }
    let path = workspace().join("target/debug/rampart");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --bin rampart` first (scripts/test does)",
        path.display()
    );
    path
}

/// True under CI, where a missing prerequisite is a failure rather than a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Returns false (and says why on stderr) when `reason` prevents a test from running; panics
/// instead under CI.
pub fn skip(test: &str, reason: &str) -> bool {
    if in_ci() {
        panic!("{test}: missing prerequisite under CI: {reason}");
    }
    eprintln!("skipping {test}: {reason}");
    false
}

/// Whether a tool is on PATH; otherwise skips (or fails under CI).
pub fn require_tool(test: &str, tool: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false);
    found
        || skip(
            test,
            &format!("`{tool}` is not installed (scripts/install-deps installs it)"),
        )
}

/// Whether the tests run as root; otherwise skips (or fails under CI).
pub fn require_root(test: &str) -> bool {
    nix::unistd::Uid::effective().is_root() || skip(test, "needs root")
}

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("rampart-test-{name}-{}-{}", std::process::id(), nanos()));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// A TCP port free on 127.0.0.1 at the time of the call.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Compares `actual` with the snapshot file `tests/snapshots/NAME`; with `UPDATE_SNAPSHOTS=1`
/// rewrites it instead.
pub fn assert_snapshot(name: &str, actual: &str) {
    let path = workspace().join("tests/snapshots").join(name);
    if std::env::var("UPDATE_SNAPSHOTS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_SNAPSHOTS=1 to create it)", path.display()));
    if expected != actual {
        let diff: Vec<String> = expected
            .lines()
            .zip(actual.lines())
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .take(5)
            .map(|(i, (a, b))| format!("line {}:\n  expected: {a}\n  actual:   {b}", i + 1))
            .collect();
        panic!(
            "{} differs from the output ({} vs {} lines):\n{}\nRun with UPDATE_SNAPSHOTS=1 if the change is intended.",
            path.display(),
            expected.lines().count(),
            actual.lines().count(),
            diff.join("\n")
        );
    }
}
