//! The channels between processes: one `socketpair(AF_UNIX, SOCK_SEQPACKET)` per link
//! (supervisor ⇄ worker, supervisor ⇄ keyring, worker ⇄ keyring).
//!
//! Each link has its own message per direction ([`LinkMessage`]: `SupervisorToWorker`,
//! `SupervisorToKeyring`, `WorkerToSupervisor`, `WorkerToKeyring`, `KeyringToWorker`), and a
//! receiver decodes only what its link carries to it: a message sent on the wrong link decodes to
//! no kind and is refused. Each message travels as one datagram, so the kernel keeps message boundaries, and
//! the file descriptors a message carries are attached to that very datagram (SCM_RIGHTS). The
//! receiver treats the peer as untrusted: a message larger than the buffer, truncated control
//! data, or file descriptors the message kind does not carry are errors, and every descriptor
//! that arrived is closed on those paths (they are wrapped in [`OwnedFd`] the moment they exist).

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, sendmsg, socketpair};
use prost::Message;

use crate::proto::{
    HandoverToNew, HandoverToOld, KeyringToWorker, SupervisorToKeyring, SupervisorToWorker, WorkerOrder,
    WorkerToKeyring, WorkerToSupervisor, handover_to_new, handover_to_old, keyring_to_worker, supervisor_to_keyring,
    supervisor_to_worker, worker_to_keyring, worker_to_supervisor,
};

/// Largest datagram a channel sends or accepts. It must fit the socket's send buffer; a large
/// state travels as many messages.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Most descriptors one message may carry; more arrive as MSG_CTRUNC and are refused.
pub const MAX_FDS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("creating the worker channel failed: {0}")]
    Create(Errno),
    #[error("sending on the worker channel failed: {0}")]
    Send(Errno),
    #[error("receiving on the worker channel failed: {0}")]
    Receive(Errno),
    #[error("message of {len} bytes exceeds the channel limit of {MAX_MESSAGE} bytes")]
    TooLarge { len: usize },
    #[error("the peer sent a message larger than the channel buffer (MSG_TRUNC)")]
    Truncated,
    #[error("the peer attached more file descriptors than the channel accepts (MSG_CTRUNC)")]
    ControlTruncated,
    #[error("message `{kind}` carries {expected} file descriptor(s), got {got}")]
    UnexpectedFds {
        kind: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("unexpected control message on the channel: {0}")]
    UnexpectedControl(String),
    #[error("channel message of {len} bytes is not a valid message of this link: {source}")]
    Decode {
        len: usize,
        #[source]
        source: prost::DecodeError,
    },
    #[error("channel message has no kind this link carries (a message of another link, or a newer protocol)")]
    Empty,
}

/// A message of one link, in one direction.
pub trait LinkMessage: Message + Default {
    /// The number of file descriptors a message of this kind carries.
    fn expected_fds(&self) -> usize;
    /// A short name for the kind, for errors and logs (`none` without a kind).
    fn kind_name(&self) -> &'static str;
}

impl LinkMessage for SupervisorToWorker {
    fn expected_fds(&self) -> usize {
        use supervisor_to_worker::Kind;
        match &self.kind {
            Some(Kind::Listener(_) | Kind::KeyringLink(_)) => 1,
            Some(Kind::Order(_) | Kind::TicketKeys(_)) | None => 0,
        }
    }

    fn kind_name(&self) -> &'static str {
        use supervisor_to_worker::Kind;
        match &self.kind {
            None => "none",
            Some(Kind::Order(_)) => "order",
            Some(Kind::Listener(_)) => "listener",
            Some(Kind::TicketKeys(_)) => "ticket_keys",
            Some(Kind::KeyringLink(_)) => "keyring_link",
        }
    }
}

impl LinkMessage for SupervisorToKeyring {
    fn expected_fds(&self) -> usize {
        use supervisor_to_keyring::Kind;
        match &self.kind {
            Some(Kind::KeyringLink(_)) => 1,
            Some(Kind::Order(_) | Kind::KeyMaterial(_) | Kind::KeyForget(_)) | None => 0,
        }
    }

    fn kind_name(&self) -> &'static str {
        use supervisor_to_keyring::Kind;
        match &self.kind {
            None => "none",
            Some(Kind::Order(_)) => "order",
            Some(Kind::KeyringLink(_)) => "keyring_link",
            Some(Kind::KeyMaterial(_)) => "key_material",
            Some(Kind::KeyForget(_)) => "key_forget",
        }
    }
}

impl LinkMessage for WorkerToSupervisor {
    fn expected_fds(&self) -> usize {
        0
    }

    fn kind_name(&self) -> &'static str {
        use worker_to_supervisor::Kind;
        match &self.kind {
            None => "none",
            Some(Kind::Reply(_)) => "reply",
            Some(Kind::JailReport(_)) => "jail_report",
            Some(Kind::Log(_)) => "log",
            Some(Kind::Metrics(_)) => "metrics",
        }
    }
}

impl LinkMessage for WorkerToKeyring {
    fn expected_fds(&self) -> usize {
        0
    }

    fn kind_name(&self) -> &'static str {
        match &self.kind {
            None => "none",
            Some(worker_to_keyring::Kind::SignRequest(_)) => "sign_request",
        }
    }
}

impl LinkMessage for KeyringToWorker {
    fn expected_fds(&self) -> usize {
        0
    }

    fn kind_name(&self) -> &'static str {
        match &self.kind {
            None => "none",
            Some(keyring_to_worker::Kind::SignReply(_)) => "sign_reply",
        }
    }
}

impl LinkMessage for HandoverToNew {
    fn expected_fds(&self) -> usize {
        use handover_to_new::Kind;
        match &self.kind {
            Some(Kind::Listener(_) | Kind::CommandSocket(_) | Kind::Prometheus(_)) => 1,
            Some(Kind::Begin(_) | Kind::Order(_) | Kind::Key(_) | Kind::End(_)) | None => 0,
        }
    }

    fn kind_name(&self) -> &'static str {
        use handover_to_new::Kind;
        match &self.kind {
            None => "none",
            Some(Kind::Begin(_)) => "begin",
            Some(Kind::Order(_)) => "order",
            Some(Kind::Listener(_)) => "listener",
            Some(Kind::CommandSocket(_)) => "command_socket",
            Some(Kind::Prometheus(_)) => "prometheus",
            Some(Kind::Key(_)) => "key",
            Some(Kind::End(_)) => "end",
        }
    }
}

impl LinkMessage for HandoverToOld {
    fn expected_fds(&self) -> usize {
        0
    }

    fn kind_name(&self) -> &'static str {
        use handover_to_old::Kind;
        match &self.kind {
            None => "none",
            Some(Kind::Ready(_)) => "ready",
            Some(Kind::Failed(_)) => "failed",
        }
    }
}

/// A message and the descriptors that came with it.
#[derive(Debug)]
pub struct Received<M> {
    pub message: M,
    pub fds: Vec<OwnedFd>,
}

/// One end of a worker channel.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<OwnedFd> for Channel {
    fn from(fd: OwnedFd) -> Self {
        Channel { fd }
    }
}

impl Channel {
    /// Creates a connected pair, both ends close-on-exec (the supervisor clears the flag on the
    /// one end a worker inherits).
    pub fn pair() -> Result<(Channel, Channel), ChannelError> {
        let (a, b) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
            .map_err(ChannelError::Create)?;
        Ok((Channel { fd: a }, Channel { fd: b }))
    }

    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Switches the socket to non-blocking mode (for use in an event loop).
    pub fn set_nonblocking(&self, nonblocking: bool) -> Result<(), ChannelError> {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        let flags = fcntl(&self.fd, FcntlArg::F_GETFL).map_err(ChannelError::Create)?;
        let mut flags = OFlag::from_bits_truncate(flags);
        flags.set(OFlag::O_NONBLOCK, nonblocking);
        fcntl(&self.fd, FcntlArg::F_SETFL(flags)).map_err(ChannelError::Create)?;
        Ok(())
    }

    /// Sends one message with exactly the descriptors its kind carries.
    pub fn send<M: LinkMessage>(&self, message: &M, fds: &[BorrowedFd<'_>]) -> Result<(), ChannelError> {
        let expected = message.expected_fds();
        if fds.len() != expected {
            return Err(ChannelError::UnexpectedFds {
                kind: message.kind_name(),
                expected,
                got: fds.len(),
            });
        }
        let bytes = message.encode_to_vec();
        if bytes.len() > MAX_MESSAGE {
            return Err(ChannelError::TooLarge { len: bytes.len() });
        }
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let rights = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
        let iov = [IoSlice::new(&bytes)];
        loop {
            match sendmsg::<()>(self.fd.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
                Ok(_) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(ChannelError::Send(e)),
            }
        }
    }

    /// Receives one message of this link. `Ok(None)` means the peer closed its end. On a
    /// non-blocking channel with nothing to read, returns `Err(ChannelError::Receive(Errno::EAGAIN))`.
    pub fn recv<M: LinkMessage>(&self) -> Result<Option<Received<M>>, ChannelError> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        // Room for MAX_FDS descriptors, u64-aligned as cmsghdr requires.
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
        let mut control = vec![0u64; space.div_ceil(8)];
        let (len, flags, fds, stray) = loop {
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: an all-zero msghdr is a valid value; the pointers set below outlive the call.
            let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
            header.msg_iov = &mut iov;
            header.msg_iovlen = 1;
            header.msg_control = control.as_mut_ptr().cast();
            header.msg_controllen = space as _;
            // SAFETY: header points at live buffers of the lengths it declares.
            let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut header, libc::MSG_CMSG_CLOEXEC) };
            if n < 0 {
                match Errno::last() {
                    Errno::EINTR => continue,
                    e => return Err(ChannelError::Receive(e)),
                }
            }
            // Take ownership of every descriptor that arrived before looking at anything else, so
            // that every error below closes them. With MSG_CTRUNC the kernel still installed the
            // descriptors that fit, and sized the header to them.
            let mut fds = Vec::new();
            let mut stray = None;
            // SAFETY: walking the control buffer the kernel filled, with the libc macros that
            // bound every header by msg_controllen.
            unsafe {
                let mut cmsg = libc::CMSG_FIRSTHDR(&header);
                while !cmsg.is_null() {
                    let c = &*cmsg;
                    if c.cmsg_level == libc::SOL_SOCKET && c.cmsg_type == libc::SCM_RIGHTS {
                        let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                        let count = (c.cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                        for i in 0..count {
                            let fd = std::ptr::read_unaligned(data.add(i));
                            // The kernel just installed this descriptor for us; nothing else owns it.
                            fds.push(OwnedFd::from_raw_fd(fd));
                        }
                    } else {
                        stray = Some(format!("level {} type {}", c.cmsg_level, c.cmsg_type));
                    }
                    cmsg = libc::CMSG_NXTHDR(&header, cmsg);
                }
            }
            break (n as usize, MsgFlags::from_bits_truncate(header.msg_flags), fds, stray);
        };
        if flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(ChannelError::ControlTruncated);
        }
        if flags.contains(MsgFlags::MSG_TRUNC) {
            return Err(ChannelError::Truncated);
        }
        if let Some(stray) = stray {
            return Err(ChannelError::UnexpectedControl(stray));
        }
        if len == 0 && fds.is_empty() {
            // A zero-length datagram is how a SEQPACKET peer's close shows up.
            return Ok(None);
        }
        let body = buf.get(..len).unwrap_or_default();
        let message = M::decode(body).map_err(|source| ChannelError::Decode { len, source })?;
        if message.kind_name() == "none" {
            return Err(ChannelError::Empty);
        }
        let expected = message.expected_fds();
        if fds.len() != expected {
            return Err(ChannelError::UnexpectedFds {
                kind: message.kind_name(),
                expected,
                got: fds.len(),
            });
        }
        Ok(Some(Received { message, fds }))
    }
}

/// Most bytes of an encoded request one order carries; a larger request is split into pieces
/// (see `WorkerOrder.chunk`). Leaves room for the order's own fields within [`MAX_MESSAGE`].
pub const ORDER_CHUNK: usize = MAX_MESSAGE - 1024;

/// The orders that carry `request` as order `sequence`: one, or as many pieces as its encoding
/// needs. Each goes in its own channel message.
pub fn order_messages(sequence: u64, request: crate::proto::Request) -> Vec<WorkerOrder> {
    let order = |request, chunk, more| WorkerOrder {
        sequence,
        request,
        chunk,
        more,
    };
    if request.encoded_len() <= ORDER_CHUNK {
        return vec![order(Some(request), Vec::new(), false)];
    }
    let bytes = request.encode_to_vec();
    let pieces: Vec<&[u8]> = bytes.chunks(ORDER_CHUNK).collect();
    let last = pieces.len().saturating_sub(1);
    pieces
        .into_iter()
        .enumerate()
        .map(|(i, piece)| order(None, piece.to_vec(), i < last))
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum AssemblyError {
    #[error("order {got} arrived while the pieces of order {expected} were still coming")]
    Interleaved { expected: u64, got: u64 },
    #[error("the pieces of order {sequence} ({len} bytes) are not a valid request: {source}")]
    Decode {
        sequence: u64,
        len: usize,
        #[source]
        source: prost::DecodeError,
    },
}

/// Puts orders that arrive in pieces back together (the receiving side of [`order_messages`]).
#[derive(Debug, Default)]
pub struct OrderAssembler {
    pending: Option<(u64, Vec<u8>)>,
}

impl OrderAssembler {
    /// Takes one received order; returns the whole order once its last piece arrived (an order
    /// that came whole is returned at once).
    pub fn push(
        &mut self,
        order: crate::proto::WorkerOrder,
    ) -> Result<Option<crate::proto::WorkerOrder>, AssemblyError> {
        if order.chunk.is_empty() && self.pending.is_none() {
            return Ok(Some(order));
        }
        let (sequence, mut bytes) = self.pending.take().unwrap_or((order.sequence, Vec::new()));
        if sequence != order.sequence {
            return Err(AssemblyError::Interleaved {
                expected: sequence,
                got: order.sequence,
            });
        }
        bytes.extend_from_slice(&order.chunk);
        if order.more {
            self.pending = Some((sequence, bytes));
            return Ok(None);
        }
        let request = crate::proto::Request::decode(bytes.as_slice()).map_err(|source| AssemblyError::Decode {
            sequence,
            len: bytes.len(),
            source,
        })?;
        Ok(Some(WorkerOrder {
            sequence,
            request: Some(request),
            chunk: Vec::new(),
            more: false,
        }))
    }
}
