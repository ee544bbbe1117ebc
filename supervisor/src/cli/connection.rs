//! The connection to the command socket: requests out, answers in, errors typed.

use super::*;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot connect to the command socket {}: {source}; is the supervisor running (`rampart start`)? \
         Name another socket with -s",
        socket.display()
    )]
    Connect {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("I/O error on the command socket while {action}: {source}")]
    Io {
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("reading the supervisor's answer: {0}")]
    Frame(#[from] FrameError),
    #[error("the supervisor closed the connection before answering request {request_id}")]
    Closed { request_id: String },
    #[error("the supervisor answered request `{got}` while request `{expected}` was waiting")]
    WrongRequestId { expected: String, got: String },
    #[error("the supervisor answered with unknown status {status}: is it a newer version than this client?")]
    UnknownStatus { status: i32 },
    /// The supervisor answered FAILURE; the message says what was wrong and what to do.
    #[error("{message}")]
    Failure { request_id: String, message: String },
    #[error("the answer to `{kind}` has no {expected}: is the supervisor another version than this client?")]
    MissingContent { kind: &'static str, expected: &'static str },
    #[error("cannot read {}: {source}", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{flag} {value}: expected {expected}")]
    Argument {
        flag: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("cannot encode the answer as JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("cannot write the output: {0}")]
    Output(#[source] io::Error),
}

impl ClientError {
    /// 1 when the supervisor refused the request, 2 for everything that kept it from answering.
    pub(super) fn exit_code(&self) -> crate::Exit {
        match self {
            ClientError::Failure { .. } => crate::Exit::Failed,
            _ => crate::Exit::BadInput,
        }
    }
}

/// The largest answer the client reads.
pub(super) const MAX_RESPONSE_BYTES: usize = 1 << 30;

/// A connection to the command socket.
pub struct Client {
    stream: UnixStream,
    frames: FrameReader,
    show_progress: bool,
}

impl Client {
    pub fn connect(socket: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
            socket: socket.to_path_buf(),
            source,
        })?;
        Ok(Client {
            stream,
            // The supervisor's answers are trusted; a dump of a large state is tens of MiB.
            frames: FrameReader::new(MAX_RESPONSE_BYTES),
            show_progress: true,
        })
    }

    /// Whether [`call`](Self::call) prints the messages of PROCESSING responses on stderr (the
    /// default). JSON output turns it off so that stderr holds only errors.
    pub fn show_progress(&mut self, show: bool) {
        self.show_progress = show;
    }

    /// Sends one request (with a generated id if empty) and returns the final OK/FAILURE response,
    /// skipping PROCESSING ones (their messages go to stderr unless progress is turned off).
    /// A FAILURE is returned as a response, not an error: see [`expect_ok`].
    pub fn call(&mut self, mut request: Request) -> Result<Response, ClientError> {
        if request.id.is_empty() {
            request.id = next_request_id();
        }
        if let Err(source) = framing::write_frame(&mut self.stream, &request) {
            // A supervisor that refuses the connection answers, then closes: the answer says why,
            // where the write only says "broken pipe".
            if source.kind() == io::ErrorKind::BrokenPipe
                && let Ok(Some(response)) = self.frames.read_message::<Response, _>(&mut self.stream)
                && response.status == ResponseStatus::Failure as i32
            {
                return Ok(response);
            }
            return Err(ClientError::Io {
                action: "sending the request",
                source,
            });
        }
        loop {
            let response = self
                .frames
                .read_message::<Response, _>(&mut self.stream)?
                .ok_or_else(|| ClientError::Closed {
                    request_id: request.id.clone(),
                })?;
            // An answer the supervisor could not tie to a request (a frame it could not decode)
            // carries no id.
            if !response.request_id.is_empty() && response.request_id != request.id {
                return Err(ClientError::WrongRequestId {
                    expected: request.id,
                    got: response.request_id,
                });
            }
            match ResponseStatus::try_from(response.status) {
                Ok(ResponseStatus::Processing) => {
                    if self.show_progress && !response.message.is_empty() {
                        warn(&response.message);
                    }
                }
                Ok(ResponseStatus::Ok | ResponseStatus::Failure) => return Ok(response),
                Err(_) => {
                    return Err(ClientError::UnknownStatus {
                        status: response.status,
                    });
                }
            }
        }
    }
}

/// Turns a FAILURE response into [`ClientError::Failure`].
pub fn expect_ok(response: Response) -> Result<Response, ClientError> {
    if response.status == ResponseStatus::Failure as i32 {
        let message = if response.message.is_empty() {
            "the supervisor refused the request without saying why".to_string()
        } else {
            response.message
        };
        return Err(ClientError::Failure {
            request_id: response.request_id,
            message,
        });
    }
    Ok(response)
}

pub(super) fn next_request_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("cli-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

pub(super) fn request_of(kind: Kind) -> Request {
    Request {
        id: String::new(),
        kind: Some(kind),
    }
}
