//! Frames on the command socket: a protobuf varint holding the message length, then the message
//! (protobuf's standard delimited encoding, as `writeDelimitedTo` or Go's `protodelim` write it).
//!
//! [`FrameReader`] accumulates bytes from a blocking or non-blocking reader, checks the declared
//! length against its maximum *before* reserving room for the body, and hands out whole messages.

use std::io::{self, Read, Write};

use prost::Message;
use zeroize::Zeroize;

/// Default cap on one frame's body.
pub const DEFAULT_MAX_FRAME: usize = 1024 * 1024;

/// A varint longer than this is malformed (a u64 needs at most 10 bytes).
const MAX_VARINT_LEN: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame declares {declared} bytes, more than the limit of {max} bytes")]
    TooLarge { declared: u64, max: usize },
    #[error("frame length prefix is not a valid varint")]
    BadLength,
    #[error("connection closed in the middle of a frame ({buffered} bytes buffered)")]
    Truncated { buffered: usize },
    #[error("frame of {len} bytes is not a valid {message}: {source}")]
    Decode {
        len: usize,
        message: &'static str,
        #[source]
        source: prost::DecodeError,
    },
    #[error(
        "frame of {len} bytes decodes to a request without a kind: it is another message type or from a newer protocol"
    )]
    NoKind { len: usize },
    #[error("I/O error on the command socket: {0}")]
    Io(#[from] io::Error),
}

/// Encodes `message` as one delimited frame.
pub fn encode_frame<M: Message>(message: &M) -> Vec<u8> {
    message.encode_length_delimited_to_vec()
}

/// Writes one frame on a blocking writer.
pub fn write_frame<M: Message, W: Write>(writer: &mut W, message: &M) -> io::Result<()> {
    writer.write_all(&encode_frame(message))?;
    writer.flush()
}

/// Outcome of parsing a varint prefix from a buffer.
enum Prefix {
    /// Not enough bytes yet.
    Incomplete,
    /// The body length and the prefix length.
    Complete { len: u64, prefix: usize },
}

fn parse_prefix(buf: &[u8]) -> Result<Prefix, FrameError> {
    let mut value: u64 = 0;
    for (i, byte) in buf.iter().take(MAX_VARINT_LEN).enumerate() {
        let bits = u64::from(byte & 0x7f);
        if i == MAX_VARINT_LEN - 1 && *byte > 1 {
            return Err(FrameError::BadLength);
        }
        value |= bits << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Prefix::Complete {
                len: value,
                prefix: i + 1,
            });
        }
    }
    if buf.len() >= MAX_VARINT_LEN {
        Err(FrameError::BadLength)
    } else {
        Ok(Prefix::Incomplete)
    }
}

/// Reassembles frames from a byte stream.
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    max: usize,
    eof: bool,
}

impl Default for FrameReader {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME)
    }
}

impl FrameReader {
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max,
            eof: false,
        }
    }

    /// Bytes received but not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// True once the reader saw the end of the stream.
    pub fn is_eof(&self) -> bool {
        self.eof
    }

    /// Adds bytes to the reassembly buffer (for callers that read themselves).
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Returns the next whole frame body if one is buffered. Checks the declared length against
    /// the limit as soon as the prefix is complete.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        match parse_prefix(&self.buf)? {
            Prefix::Incomplete => Ok(None),
            Prefix::Complete { len, prefix } => {
                if len > self.max as u64 {
                    return Err(FrameError::TooLarge {
                        declared: len,
                        max: self.max,
                    });
                }
                // `len <= max` fits usize.
                let total = prefix + len as usize;
                if self.buf.len() < total {
                    return Ok(None);
                }
                let body = self.buf.get(prefix..total).map(<[u8]>::to_vec).unwrap_or_default();
                self.buf.drain(..total);
                // A frame may carry a private key: what it occupied must not linger in the
                // buffer's spare capacity.
                self.buf.spare_capacity_mut().zeroize();
                Ok(Some(body))
            }
        }
    }

    /// How many more bytes the current frame needs, when its prefix is known.
    fn wanted(&self) -> Result<usize, FrameError> {
        match parse_prefix(&self.buf)? {
            Prefix::Incomplete => Ok(1),
            Prefix::Complete { len, prefix } => {
                if len > self.max as u64 {
                    return Err(FrameError::TooLarge {
                        declared: len,
                        max: self.max,
                    });
                }
                Ok((prefix + len as usize).saturating_sub(self.buf.len()).max(1))
            }
        }
    }

    /// Reads from `reader` until a whole frame is available and returns its body.
    ///
    /// On a non-blocking reader, returns `Ok(None)` when the reader would block; call again when
    /// it is readable. On end of stream, returns `Ok(None)` with [`is_eof`](Self::is_eof) set when
    /// no partial frame is buffered, and [`FrameError::Truncated`] otherwise.
    pub fn read_frame<R: Read>(&mut self, reader: &mut R) -> Result<Option<Vec<u8>>, FrameError> {
        let mut chunk = [0u8; 8192];
        let result = self.read_frame_with(reader, &mut chunk);
        // The stack copy of what was read is wiped too (frames may carry private keys).
        chunk.zeroize();
        result
    }

    fn read_frame_with<R: Read>(&mut self, reader: &mut R, chunk: &mut [u8]) -> Result<Option<Vec<u8>>, FrameError> {
        loop {
            if let Some(body) = self.next_frame()? {
                return Ok(Some(body));
            }
            if self.eof {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated {
                        buffered: self.buf.len(),
                    })
                };
            }
            // Never read past the current frame's end by more than one chunk, and never reserve
            // more than what arrived: the declared length only bounds the loop.
            let want = self.wanted()?.min(chunk.len());
            let window = chunk.get_mut(..want).unwrap_or_default();
            match reader.read(window) {
                Ok(0) => self.eof = true,
                Ok(n) => self.buf.extend_from_slice(window.get(..n).unwrap_or_default()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(FrameError::Io(e)),
            }
        }
    }

    /// Reads and decodes the next message of type `M`.
    pub fn read_message<M: Message + Default, R: Read>(&mut self, reader: &mut R) -> Result<Option<M>, FrameError> {
        match self.read_frame(reader)? {
            None => Ok(None),
            Some(body) => decode_body(&body).map(Some),
        }
    }
}

/// Decodes one frame body as `M`.
pub fn decode_body<M: Message + Default>(body: &[u8]) -> Result<M, FrameError> {
    M::decode(body).map_err(|source| FrameError::Decode {
        len: body.len(),
        message: std::any::type_name::<M>().rsplit("::").next().unwrap_or("message"),
        source,
    })
}

/// Decodes one frame body as a [`Request`](crate::proto::Request) and refuses one without a kind
/// (what another message type usually decodes to).
pub fn decode_request(body: &[u8]) -> Result<crate::proto::Request, FrameError> {
    let request: crate::proto::Request = decode_body(body)?;
    if request.kind.is_none() {
        return Err(FrameError::NoKind { len: body.len() });
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{self, request::Kind};

    fn status_request(id: &str) -> proto::Request {
        proto::Request {
            id: id.into(),
            kind: Some(Kind::Status(proto::Empty {})),
        }
    }

    /// A reader that hands out at most `step` bytes per call and then WouldBlock once.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        step: usize,
        blocked: bool,
    }

    impl Read for Trickle {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            if self.blocked {
                self.blocked = false;
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.blocked = true;
            let n = self.step.min(out.len()).min(self.data.len() - self.pos);
            out[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    #[test]
    fn partial_non_blocking_reads_reassemble_frames() {
        let mut data = encode_frame(&status_request("a"));
        data.extend(encode_frame(&status_request("b")));
        let mut reader = Trickle {
            data,
            pos: 0,
            step: 1,
            blocked: false,
        };
        let mut frames = FrameReader::default();
        let mut got = Vec::new();
        for _ in 0..1000 {
            match frames.read_message::<proto::Request, _>(&mut reader) {
                Ok(Some(m)) => got.push(m.id),
                Ok(None) if frames.is_eof() => break,
                Ok(None) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, vec!["a", "b"]);
    }

    #[test]
    fn oversized_frame_is_rejected_from_its_prefix_alone() {
        // Only the prefix is sent: the reader must refuse without waiting for (or allocating) the body.
        let mut prefix = Vec::new();
        prost::encoding::encode_varint(DEFAULT_MAX_FRAME as u64 + 1, &mut prefix);
        let mut frames = FrameReader::default();
        let err = frames.read_frame(&mut prefix.as_slice()).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { declared, .. } if declared == DEFAULT_MAX_FRAME as u64 + 1));
        assert!(frames.buf.capacity() < 64, "no room reserved for the body");
    }

    #[test]
    fn huge_declared_length_is_rejected() {
        let mut prefix = Vec::new();
        prost::encoding::encode_varint(u64::MAX, &mut prefix);
        let err = FrameReader::default().read_frame(&mut prefix.as_slice()).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }));
    }

    #[test]
    fn overlong_varint_is_malformed() {
        let bytes = [0xffu8; 11];
        let err = FrameReader::default().read_frame(&mut &bytes[..]).unwrap_err();
        assert!(matches!(err, FrameError::BadLength), "{err:?}");
    }

    #[test]
    fn truncated_frame_is_reported_at_end_of_stream() {
        let data = encode_frame(&status_request("abcdef"));
        let cut = &data[..data.len() - 2];
        let err = FrameReader::default().read_frame(&mut &cut[..]).unwrap_err();
        assert!(matches!(err, FrameError::Truncated { .. }), "{err:?}");
    }

    #[test]
    fn clean_end_of_stream_is_not_an_error() {
        let mut frames = FrameReader::default();
        assert!(frames.read_frame(&mut &[][..]).unwrap().is_none());
        assert!(frames.is_eof());
    }

    #[test]
    fn a_response_sent_as_a_request_is_refused() {
        let response = proto::Response {
            request_id: "r1".into(),
            status: proto::ResponseStatus::Ok as i32,
            message: "done".into(),
            content: None,
        };
        let frame = encode_frame(&response);
        let body = FrameReader::default()
            .read_frame(&mut frame.as_slice())
            .unwrap()
            .unwrap();
        let err = decode_request(&body).unwrap_err();
        assert!(
            matches!(err, FrameError::NoKind { .. } | FrameError::Decode { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn garbage_body_is_a_decode_error() {
        let mut data = Vec::new();
        prost::encoding::encode_varint(4, &mut data);
        data.extend([0xff, 0xff, 0xff, 0xff]);
        let err = FrameReader::default()
            .read_message::<proto::Request, _>(&mut data.as_slice())
            .unwrap_err();
        assert!(matches!(err, FrameError::Decode { message: "Request", .. }), "{err:?}");
    }
}
