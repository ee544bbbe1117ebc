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

/// A TCP port free on 127.0.0.1 at the time of the call, and never handed out twice in this
/// process: rampart binds with SO_REUSEPORT, so two tests given the same port would silently
/// share it.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
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

/// A running `rampart start`, stopped (SIGKILL to the supervisor, whose workers die with it
/// through PDEATHSIG) when dropped.
pub struct Rampart {
    pub child: std::process::Child,
    pub dir: TempDir,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    /// The binary it was started from.
    pub bin: PathBuf,
}

/// The common head of a test configuration: paths inside `dir`.
pub fn config_head(dir: &Path, workers: u16) -> String {
    format!(
        "command_socket = \"{d}/rampart.sock\"\nstate_dir = \"{d}/state\"\naudit_log = \"{d}/audit.log\"\nworker_count = {workers}\n",
        d = dir.display()
    )
}

impl Rampart {
    /// Starts rampart with `config` (written to a file in a new temporary directory; use
    /// `{dir}` in it for that directory) and waits until every worker runs.
    pub fn start(name: &str, config: &str) -> Rampart {
        Self::start_with(name, config, &[])
    }

    pub fn start_with(name: &str, config: &str, extra_args: &[&str]) -> Rampart {
        Self::start_inner(name, config, extra_args, None, &[])
    }

    /// Starts rampart with a soft open-file limit of `nofile` (its hard limit unchanged).
    pub fn start_with_nofile(name: &str, config: &str, nofile: u64) -> Rampart {
        Self::start_inner(name, config, &[], Some(nofile), &[])
    }

    /// Starts rampart with these variables added to its environment (the test hooks).
    pub fn start_with_env(name: &str, config: &str, env: &[(&str, &str)]) -> Rampart {
        Self::start_inner(name, config, &[], None, env)
    }

    /// Starts rampart from a copy of the binary in its own directory (`bin`), which an upgrade
    /// test may then replace or remove, with these variables added to its environment.
    pub fn start_copied(name: &str, config: &str, env: &[(&str, &str)]) -> Rampart {
        Self::start_from(name, config, &[], None, env, true)
    }

    fn start_inner(
        name: &str,
        config: &str,
        extra_args: &[&str],
        nofile: Option<u64>,
        env: &[(&str, &str)],
    ) -> Rampart {
        Self::start_from(name, config, extra_args, nofile, env, false)
    }

    fn start_from(
        name: &str,
        config: &str,
        extra_args: &[&str],
        nofile: Option<u64>,
        env: &[(&str, &str)],
        copy: bool,
    ) -> Rampart {
        let dir = TempDir::new(name);
        let text = config.replace("{dir}", &dir.path().display().to_string());
        let config_path = dir.path().join("rampart.toml");
        std::fs::write(&config_path, &text).unwrap();
        let log = dir.path().join("rampart.log");
        let bin = if copy {
            let bin = dir.path().join("bin/rampart");
            std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
            std::fs::copy(rampart_bin(), &bin).unwrap();
            bin
        } else {
            rampart_bin()
        };
        let child = Self::spawn_supervisor(&bin, &config_path, &log, extra_args, nofile, env);
        let socket = dir.path().join("rampart.sock");
        let r = Rampart {
            child,
            dir,
            config: config_path,
            socket,
            log,
            bin,
        };
        r.wait_running();
        r
    }

    /// Kills the supervisor with SIGKILL (its workers die with it) and starts it again on the
    /// same directory and configuration, appending to the same log.
    pub fn kill_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The workers go with their supervisor (PDEATHSIG); wait until they are gone.
        std::thread::sleep(std::time::Duration::from_millis(300));
        self.child = Self::spawn_supervisor(&self.bin, &self.config, &self.log, &[], None, &[]);
        self.wait_running();
    }

    /// `rampart audit verify --live` on the test's audit log (the chain and its order; a running
    /// supervisor has not written its closing checkpoint yet) must pass.
    pub fn assert_audit_verifies(&self) {
        let out = std::process::Command::new(rampart_bin())
            .args(["audit", "verify", "--live"])
            .arg(self.dir.path().join("audit.log"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "audit verify failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The records of the audit log (`audit.log` in the test directory), parsed.
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("audit.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn spawn_supervisor(
        bin: &Path,
        config_path: &Path,
        log: &Path,
        extra_args: &[&str],
        nofile: Option<u64>,
        env: &[(&str, &str)],
    ) -> std::process::Child {
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let mut command = std::process::Command::new(bin);
        command
            .arg("start")
            .arg("-c")
            .arg(config_path)
            .args(extra_args)
            .envs(env.iter().copied())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file);
        if let Some(soft) = nofile {
            use std::os::unix::process::CommandExt;
            let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
            // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, soft, hard)
                        .map_err(std::io::Error::from)
                });
            }
        }
        command.spawn().unwrap()
    }

    /// Waits until every worker reports running (10 s at most).
    pub fn wait_running(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Ok(out) = self.try_ctl(&["workers", "--json"])
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&out)
                && let Some(workers) = v["content"]["workers"]["workers"].as_array()
                && !workers.is_empty()
                && workers.iter().all(|w| w["run_state"] == "running")
            {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "rampart did not start:\n{}",
                self.log_text()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs a client command; Ok(stdout) on success, Err(stdout + stderr) otherwise.
    pub fn try_ctl(&self, args: &[&str]) -> Result<String, String> {
        let out = std::process::Command::new(rampart_bin())
            .arg("-s")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
        }
    }

    /// Runs a client command that must succeed.
    pub fn ctl(&self, args: &[&str]) -> String {
        self.try_ctl(args)
            .unwrap_or_else(|e| panic!("rampart {args:?} failed: {e}"))
    }

    /// The pids of the running processes of one role ("worker" or "keyring").
    pub fn running_pids(&self, role: &str) -> Vec<i32> {
        let v: serde_json::Value = serde_json::from_str(&self.ctl(&["workers", "--json"])).unwrap();
        v["content"]["workers"]["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["role"] == role && w["run_state"] == "running")
            .filter_map(|w| w["pid"].as_i64())
            .map(|p| p as i32)
            .collect()
    }

    /// The workers' pids, from `rampart workers --json`.
    pub fn worker_pids(&self) -> Vec<i32> {
        let v: serde_json::Value = serde_json::from_str(&self.ctl(&["workers", "--json"])).unwrap();
        v["content"]["workers"]["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["role"] != "keyring")
            .filter_map(|w| w["pid"].as_i64())
            .filter(|p| *p > 0)
            .map(|p| p as i32)
            .collect()
    }
}

impl Rampart {
    /// The pid of the supervisor serving now (after an upgrade, not `child`'s).
    pub fn supervisor_pid(&self) -> Option<i32> {
        let out = self.try_ctl(&["status", "--json"]).ok()?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        v["content"]["status_report"]["pid"].as_i64().map(|p| p as i32)
    }
}

impl Drop for Rampart {
    fn drop(&mut self) {
        // An upgraded supervisor is not our child: stop whichever one serves.
        if let Some(pid) = self.supervisor_pid()
            && pid != self.child.id() as i32
        {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nginx serving a fixed body on a free port, with its own prefix; stopped when dropped.
pub struct Nginx {
    pub child: std::process::Child,
    pub port: u16,
    pub dir: TempDir,
}

impl Nginx {
    /// Starts nginx with `locations` inside its server block (e.g. `location / { return 200 "ok"; }`).
    pub fn start(name: &str, locations: &str) -> Option<Nginx> {
        if !require_tool(name, "nginx") && !Path::new("/usr/sbin/nginx").exists() {
            return None;
        }
        let dir = TempDir::new(&format!("nginx-{name}"));
        let port = free_port();
        let d = dir.path().display();
        let conf = format!(
            "worker_processes 1;\ndaemon off;\nerror_log {d}/error.log;\npid {d}/nginx.pid;\nuser root;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n access_log off;\n client_body_temp_path {d};\n proxy_temp_path {d};\n fastcgi_temp_path {d};\n uwsgi_temp_path {d};\n scgi_temp_path {d};\n\
             keepalive_requests 100000;\n client_max_body_size 0;\n\
             server {{\n listen 127.0.0.1:{port};\n root {d}/www;\n{locations}\n }}\n}}\n"
        );
        std::fs::create_dir_all(dir.path().join("www")).unwrap();
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let nginx = if Path::new("/usr/sbin/nginx").exists() {
            "/usr/sbin/nginx".to_string()
        } else {
            "nginx".to_string()
        };
        let child = std::process::Command::new(nginx)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Some(Nginx { child, port, dir })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its worker first. SIGKILL would leave the worker running,
        // orphaned, long after the test.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends raw bytes on a new connection and returns everything received until the peer closes
/// or `timeout` passes.
pub fn raw_exchange(port: u16, bytes: &[u8], timeout: std::time::Duration) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A tiny HTTP/1.1 backend for tests: answers every request with a JSON description of what it
/// received (method, path, headers, body length), keeps connections alive, and sleeps first
/// when the path is `/sleep/<ms>`.
pub struct EchoBackend {
    pub port: u16,
    requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// Method, path, headers and body length of one request.
type Received = (String, String, Vec<(String, String)>, usize);

fn read_request(stream: &mut std::io::BufReader<std::net::TcpStream>) -> Option<Received> {
    use std::io::{BufRead, Read};
    let mut line = String::new();
    if stream.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        stream.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let mut body = 0usize;
    if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            stream.read_line(&mut size).ok()?;
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            if n == 0 {
                let mut end = String::new();
                stream.read_line(&mut end).ok()?;
                break;
            }
            let mut chunk = vec![0u8; n + 2];
            stream.read_exact(&mut chunk).ok()?;
            body += n;
        }
    } else if let Some(len) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        let mut remaining = len;
        let mut buf = vec![0u8; 65536];
        while remaining > 0 {
            let n = stream.read(&mut buf[..remaining.min(65536)]).ok()?;
            if n == 0 {
                return None;
            }
            remaining -= n;
        }
        body = len;
    }
    Some((method, path, headers, body))
}

impl EchoBackend {
    pub fn start() -> EchoBackend {
        Self::start_on(0)
    }

    /// On a given port (0: any free one).
    pub fn start_on(port: u16) -> EchoBackend {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = std::sync::Arc::clone(&requests);
        let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let accepted = std::sync::Arc::clone(&connections);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let counter = std::sync::Arc::clone(&counter);
                std::thread::spawn(move || {
                    use std::io::Write;
                    let mut writer = stream.try_clone().unwrap();
                    let mut reader = std::io::BufReader::new(stream);
                    while let Some((method, path, headers, body)) = read_request(&mut reader) {
                        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if path == "/upgrade" {
                            // Switch protocols, then echo bytes back upper-cased until the client closes.
                            use std::io::Read;
                            let head =
                                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n";
                            if writer.write_all(head).is_err() {
                                break;
                            }
                            let mut buf = [0u8; 4096];
                            loop {
                                match reader.read(&mut buf) {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => {
                                        if writer.write_all(&buf[..n].to_ascii_uppercase()).is_err() {
                                            return;
                                        }
                                    }
                                }
                            }
                        }
                        if let Some(ms) = path.strip_prefix("/sleep/").and_then(|m| m.parse::<u64>().ok()) {
                            std::thread::sleep(std::time::Duration::from_millis(ms));
                        }
                        let headers: serde_json::Map<String, serde_json::Value> = headers
                            .into_iter()
                            .map(|(k, v)| (k.to_ascii_lowercase(), serde_json::Value::String(v)))
                            .collect();
                        let json = serde_json::json!({"method": method, "path": path, "headers": headers, "body_length": body, "port": port});
                        let text = json.to_string();
                        let response = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
                            text.len()
                        );
                        if writer.write_all(response.as_bytes()).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        EchoBackend {
            port,
            requests,
            connections,
        }
    }

    /// How many connections it has accepted.
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How many requests it has received.
    pub fn requests(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A backend address whose connections never complete: a listening socket with a queue of one,
/// filled, so the kernel drops every further SYN and a connect attempt hangs until its timeout
/// (a backend that has stopped answering, without the instant refusal of a closed port).
pub struct SilentBackend {
    pub port: u16,
    _listener: std::os::fd::OwnedFd,
    _queued: Vec<std::net::TcpStream>,
}

impl SilentBackend {
    pub fn start() -> SilentBackend {
        use nix::sys::socket::{
            AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, getsockname, listen, socket,
        };
        use std::os::fd::AsRawFd;
        let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
        bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, 0)).unwrap();
        listen(&fd, Backlog::new(0).unwrap()).unwrap();
        let port = getsockname::<SockaddrIn>(fd.as_raw_fd()).unwrap().port();
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        // Fill the accept queue (never accepted): the first connect that does not complete
        // shows that SYNs are now dropped.
        let mut queued = Vec::new();
        while let Ok(s) = std::net::TcpStream::connect_timeout(&address, std::time::Duration::from_millis(300)) {
            queued.push(s);
            assert!(queued.len() < 16, "the accept queue of {port} does not fill up");
        }
        SilentBackend {
            port,
            _listener: fd,
            _queued: queued,
        }
    }
}

/// A TCP backend that echoes every byte back, on a free port.
pub fn tcp_echo() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut s = stream;
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

impl Rampart {
    /// Sends one request, as protobuf frames, straight to the command socket (for what the CLI
    /// would refuse before sending) and returns the response.
    pub fn send_request(&self, kind: rampart_command::proto::request::Kind) -> rampart_command::proto::Response {
        use std::io::Write;
        let mut stream = std::os::unix::net::UnixStream::connect(&self.socket).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let request = rampart_command::proto::Request {
            id: "raw".into(),
            kind: Some(kind),
        };
        stream
            .write_all(&rampart_command::framing::encode_frame(&request))
            .unwrap();
        let mut reader = rampart_command::framing::FrameReader::default();
        reader.read_message(&mut stream).unwrap().unwrap()
    }
}
