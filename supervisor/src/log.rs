//! The supervisor's log: its own lines and the workers' (which reach it over their channels),
//! written to stdout, stderr or a file (reopened on SIGHUP).

use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
}

enum Target {
    Stdout,
    Stderr,
    File(PathBuf, Option<std::fs::File>),
    /// The local syslog socket; a line that cannot be sent goes to stderr instead.
    Syslog(Option<std::os::unix::net::UnixDatagram>),
}

fn syslog_socket() -> Option<std::os::unix::net::UnixDatagram> {
    let socket = std::os::unix::net::UnixDatagram::unbound().ok()?;
    socket.connect("/dev/log").ok()?;
    socket.set_nonblocking(true).ok()?;
    Some(socket)
}

pub struct Log {
    target: Target,
    level: Level,
}

fn parse_level(text: &str) -> Option<Level> {
    match text.trim().to_ascii_lowercase().as_str() {
        "error" => Some(Level::Error),
        "warn" | "warning" => Some(Level::Warn),
        "info" => Some(Level::Info),
        "debug" | "trace" => Some(Level::Debug),
        _ => None,
    }
}

impl Log {
    pub fn new(target: &str, level: &str) -> Log {
        let target = match target {
            "stdout" | "" => Target::Stdout,
            "stderr" => Target::Stderr,
            "syslog" => Target::Syslog(syslog_socket()),
            path => {
                let path = PathBuf::from(path);
                let file = open(&path);
                Target::File(path, file)
            }
        };
        Log {
            target,
            level: parse_level(level).unwrap_or(Level::Info),
        }
    }

    pub fn set_level(&mut self, text: &str) -> Result<(), String> {
        self.level =
            parse_level(text).ok_or_else(|| format!("unknown level `{text}`: use error, warn, info or debug"))?;
        Ok(())
    }

    pub fn reopen(&mut self) {
        match &mut self.target {
            Target::File(path, file) => *file = open(path),
            Target::Syslog(socket) => *socket = syslog_socket(),
            _ => {}
        }
    }

    fn write(&mut self, level: Level, message: &str) {
        if level > self.level {
            return;
        }
        let name = match level {
            Level::Error => "ERROR",
            Level::Warn => "WARN",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
        };
        if let Target::Syslog(socket) = &mut self.target {
            // Facility daemon (3); severity from the level.
            let severity = match level {
                Level::Error => 3,
                Level::Warn => 4,
                Level::Info => 6,
                Level::Debug => 7,
            };
            let line = format!(
                "<{}>rampart[{}]: {name} {message}",
                3 * 8 + severity,
                std::process::id()
            );
            let sent = socket.as_ref().is_some_and(|s| s.send(line.as_bytes()).is_ok());
            if !sent {
                *socket = syslog_socket();
                if socket.as_ref().is_none_or(|s| s.send(line.as_bytes()).is_err()) {
                    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
                }
            }
            return;
        }
        let now = humantime::format_rfc3339_millis(std::time::SystemTime::now());
        let line = format!("{now} {name} {message}\n");
        let _ = match &mut self.target {
            Target::Stdout => std::io::stdout().write_all(line.as_bytes()),
            Target::Stderr => std::io::stderr().write_all(line.as_bytes()),
            Target::File(_, Some(f)) => f.write_all(line.as_bytes()),
            Target::File(_, None) | Target::Syslog(_) => std::io::stderr().write_all(line.as_bytes()),
        };
    }

    pub fn error(&mut self, m: &str) {
        self.write(Level::Error, m);
    }
    pub fn warn(&mut self, m: &str) {
        self.write(Level::Warn, m);
    }
    pub fn info(&mut self, m: &str) {
        self.write(Level::Info, m);
    }
}

fn open(path: &PathBuf) -> Option<std::fs::File> {
    std::fs::OpenOptions::new().create(true).append(true).open(path).ok()
}
